"""A failed-over machine knows it is one (agent/lifecycle/failover.py): the hypervisor's SMBIOS OEM strings or the
image's marker, read as the kernel shows them, recorded at first sight, and what the agent may do with the source's
registration. The daemon's side is in test_daemon.py, the bootstrapper's below, the server's in
tests/server/api/test_enrolment.py; a booted failover in tests/integration/test_vm_protection.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.bootstrap import BootstrapSettings, bootstrap
from agent.lifecycle.failover import (
    Failover,
    detect,
    load_failover,
    oem_strings,
    parse_mark_file,
    parse_smbios,
    read_signal,
    speaks_as_source,
)
from tests.conftest import DISTROS

POINT = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"
LATER = "6a0c2f9e-8d47-4b1a-9c3e-5f7d1e2a4b60"
HOST = "5d9c7f3e-1b2a-4c8d-9e0f-a1b2c3d4e5f6"
OTHER = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"
# /sys/firmware/dmi/entries/11-0/raw of a lab VM started with -smbios type=11,value=mobility-test-failover:abc
QEMU_ENTRY = b"\x0b\x05\x00\x0e\x01mobility-test-failover:abc\x00\x00"


def entry(paths: Paths, *strings: str, n: int = 0) -> None:
    d = paths.root / f"sys/firmware/dmi/entries/11-{n}"
    d.mkdir(parents=True)
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    (d / "raw").write_bytes(bytes([11, 5, 0, 0x0E, len(strings)]) + body)


def mark_file(paths: Paths, kind: str, host: str = HOST, point: str = POINT) -> None:
    """The mark as `failover` writes it into the images it makes."""
    path = paths.root / "etc/mobility/failover.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"mark": "mobility-failover", "version": 1, "kind": kind, "host_id": host, "point_id": point}
    path.write_text(json.dumps({**doc, "point_created": 1.0, "marked_at": 2.0}))


def test_oem_strings_as_the_kernel_shows_them() -> None:
    assert oem_strings(QEMU_ENTRY) == ["mobility-test-failover:abc"]
    two = b"\x0b\x05\x00\x0e\x02vendor=x\x00mobility-failover:p\x00\x00"
    assert oem_strings(two) == ["vendor=x", "mobility-failover:p"]
    for bad in (b"", b"\x0b\x05\x00", b"\x01\x05\x00\x0e\x01x\x00\x00", b"\x0b\xff\x00\x0e\x01x\x00\x00"):
        assert oem_strings(bad) == []
    assert oem_strings(b"\x0b\x05\x00\x0e\x01only\x00second\x00\x00") == ["only"]  # the count bounds it


def test_a_mark_names_a_test_or_a_real_failover_of_a_machine_s_point() -> None:
    test = parse_smbios(f"mobility-failover:v1:test:{HOST}:{POINT}")
    assert test is not None and (test.test, test.host_id, test.point_id, test.source) == (True, HOST, POINT, "smbios")
    real = parse_smbios(f"  mobility-failover:v1:failover:{HOST}:{POINT}\n")
    assert real is not None and not real.test
    for text in (
        f"mobility-failover:v2:test:{HOST}:{POINT}",
        f"mobility-failover:v1:drill:{HOST}:{POINT}",
        f"mobility-failover:v1:test:{HOST}:{POINT.upper()}",
        f"mobility-failover:v1:test:{HOST}",
        "mobility-failover:abc",
        "",
    ):
        assert parse_smbios(text) is None, text
    doc = {"mark": "mobility-failover", "version": 1, "kind": "failover", "host_id": HOST, "point_id": POINT}
    found = parse_mark_file(json.dumps(doc).encode())
    assert found is not None and (found.test, found.source) == (False, "/etc/mobility/failover.json")
    for bad in ({**doc, "version": 2}, {**doc, "mark": "other"}, {**doc, "kind": "x"}, {**doc, "host_id": "h"}, []):
        assert parse_mark_file(json.dumps(bad).encode()) is None
    assert parse_mark_file(b"\xff{") is None


def test_the_hypervisor_s_string_comes_before_the_image_s_mark(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert read_signal(paths) is None
    mark_file(paths, "failover")
    found = read_signal(paths)
    assert found is not None and (found.test, found.source) == (False, "/etc/mobility/failover.json")
    entry(paths, "vendor=acme", f"mobility-failover:v1:test:{HOST}:{LATER}")
    found = read_signal(paths)
    assert found is not None and (found.test, found.point_id, found.source) == (True, LATER, "smbios")


def test_detect_records_the_first_sight_and_a_new_point_replaces_it(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert detect(paths, 1.0) is None and load_failover(paths) is None
    entry(paths, f"mobility-failover:v1:failover:{HOST}:{POINT}")
    first = detect(paths, 2.0)
    assert first == Failover(False, POINT, HOST, 2.0) == load_failover(paths)
    assert detect(paths, 3.0) == first  # the same mark later: the record stays
    shutil.rmtree(tmp_path / "sys")
    assert detect(paths, 4.0) == first  # the hypervisor no longer says it: still a failover
    # That machine, registered as OTHER and protected in turn, has a point of its own tested.
    entry(paths, f"mobility-failover:v1:test:{OTHER}:{LATER}")
    assert detect(paths, 5.0) == Failover(True, LATER, OTHER, 5.0)
    (tmp_path / "var/lib/mobility/failover.json").write_text("{not json")
    assert load_failover(paths) is None  # damaged: the mark decides again


def test_which_registration_a_failover_must_not_use() -> None:
    test, real = Failover(True, POINT, "host-1", 1.0), Failover(False, POINT, "host-1", 1.0)
    assert speaks_as_source(test, "host-1") and speaks_as_source(test, "host-2")
    assert speaks_as_source(real, "host-1") and not speaks_as_source(real, "host-2")
    assert not speaks_as_source(None, "host-1") and not speaks_as_source(real, None)


def test_the_bootstrapper_leaves_a_test_failover_alone(tmp_path: Path) -> None:
    """A test failover's bootstrapper installs, registers and reports nothing (its server is not to hear of it)."""
    shutil.copytree(DISTROS / "debian12", tmp_path, dirs_exist_ok=True)
    paths = Paths(tmp_path)
    mark_file(paths, "test")
    settings = BootstrapSettings(server="127.0.0.1:9", passphrase_file=str(tmp_path / "none"), retry_for=0.1)
    outcome = bootstrap(paths, settings)
    assert (outcome.state, outcome.message) == (
        "test failover",
        f"this machine is a test failover of {HOST} at point {POINT}: nothing is installed, registered or reported",
    )
    assert sorted(p.name for p in (tmp_path / "var/lib/mobility").iterdir()) == ["failover.json"]  # its record
