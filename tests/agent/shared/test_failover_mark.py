"""The failover mark both sides read: the SMBIOS OEM string and the file, and the type 11 structure a guest's kernel
shows (the string as a real QEMU guest saw it is checked in tests/integration/test_vm_failover.py)."""

from __future__ import annotations

import json
import struct
import uuid

import pytest

from agent.shared.failover_mark import MAX_MARK_BYTES, FailoverMark, MarkInvalid, oem_strings

HOST, POINT = str(uuid.uuid4()), str(uuid.uuid4())


def test_the_smbios_string_and_the_file_carry_the_mark_there_and_back() -> None:
    mark = FailoverMark("failover", HOST, POINT, 1_700_000_000.5, 1_700_000_100.0)
    assert mark.smbios() == f"mobility-failover:v1:failover:{HOST}:{POINT}"
    assert mark.qemu_smbios() == f"type=11,value={mark.smbios()}" and "," not in mark.smbios()
    back = FailoverMark.from_smbios(mark.smbios())
    assert back == FailoverMark("failover", HOST, POINT)  # the string carries no times
    assert FailoverMark.from_file_text(mark.file_text().encode()) == mark
    assert FailoverMark.from_smbios(FailoverMark("test", HOST, POINT).smbios()) == FailoverMark("test", HOST, POINT)


def test_strings_of_other_software_are_not_marks_and_ours_malformed_are_refused() -> None:
    for foreign in ("", "Dell System", "mobility", "mobility-failoverx:v1", "vboxVer_7.0.12"):
        assert FailoverMark.from_smbios(foreign) is None
    for bad in (
        f"mobility-failover:v2:test:{HOST}:{POINT}",
        f"mobility-failover:v1:real:{HOST}:{POINT}",
        f"mobility-failover:v1:test:{HOST.upper()}:{POINT}",
        f"mobility-failover:v1:test:{HOST}:{POINT}:extra",
        f"mobility-failover:v1:test:{HOST}",
        "mobility-failover:v1:test:" + "-" * 36 + ":" + POINT,
        f"mobility-failover:v1:test:{HOST}:{POINT}\n",
    ):
        with pytest.raises(MarkInvalid):
            FailoverMark.from_smbios(bad)
    with pytest.raises(MarkInvalid):
        FailoverMark("test", "not-a-uuid", POINT)
    with pytest.raises(MarkInvalid):
        FailoverMark("primary", HOST, POINT)  # type: ignore[arg-type]


def test_a_mark_file_that_is_not_one_is_refused() -> None:
    good = FailoverMark("failover", HOST, POINT, 1.0, 2.0).to_json()
    cases = [
        b"not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({**good, "mark": "other"}).encode(),
        json.dumps({**good, "version": 2}).encode(),
        json.dumps({**good, "kind": "both"}).encode(),
        json.dumps({**good, "host_id": 7}).encode(),
        json.dumps({**good, "point_id": POINT.upper()}).encode(),
        json.dumps({**good, "point_created": 1e300}).encode(),
        json.dumps({**good, "marked_at": True}).encode(),
        json.dumps({**good, "pad": "x" * MAX_MARK_BYTES}).encode(),
    ]
    for data in cases:
        with pytest.raises(MarkInvalid):
            FailoverMark.from_file_text(data)


def smbios_type11(*strings: bytes, count: int | None = None) -> bytes:
    """A type 11 structure as /sys/firmware/dmi/entries/11-0/raw shows it: type, length 5, handle, count, strings."""
    body = b"".join(s + b"\0" for s in strings) + b"\0"
    return struct.pack("<BBHB", 11, 5, 0x1100, len(strings) if count is None else count) + body


def test_oem_strings_are_read_from_a_type_11_structure_and_malformed_ones_give_what_can_be_read() -> None:
    mark = FailoverMark("test", HOST, POINT).smbios().encode()
    assert oem_strings(smbios_type11(b"first", mark)) == ["first", mark.decode()]
    assert oem_strings(smbios_type11(mark, count=9)) == [mark.decode()]  # claims more than it holds
    assert oem_strings(smbios_type11(b"a", b"b", count=1)) == ["a"]
    assert oem_strings(b"") == [] and oem_strings(b"\x0b\x05") == []
    assert oem_strings(b"\x01" + smbios_type11(mark)[1:]) == []  # not type 11
    assert oem_strings(b"\x0b\xff\x00\x00\x01abc\0\0") == []  # a length past its end
    assert oem_strings(smbios_type11(b"\xff\xfe")) == ["\ufffd\ufffd"]
