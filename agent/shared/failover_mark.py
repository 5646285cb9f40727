"""How a failed-over machine knows it is one: the mark the server gives it, and how either side reads it
(docs/replication.md, "A failed-over machine knows it is one"). Standard library only: the server writes the mark,
the agent in the failed-over machine reads it.

One content, two carriers:

- an SMBIOS OEM string (type 11) that the hypervisor gives the machine: ``mobility-failover:v1:KIND:HOST_ID:POINT_ID``.
  `test-failover --boot` passes it with QEMU's ``-smbios type=11,value=...``; for a real failover the operator gives
  it to their hypervisor (`failover` prints it and writes it into ``point.json``). The guest reads it from
  ``/sys/firmware/dmi/entries/11-*/raw`` (`oem_strings`) or ``dmidecode -t 11``;
- a file in the machine's root filesystem, ``/etc/mobility/failover.json`` (`MARK_FILE`), that `failover` writes into
  the images it produces (inside a throwaway VM, never in the server's kernel).

KIND is ``test`` (a test failover: an isolated copy that must never act as the source, nor as anyone) or ``failover``
(a real one: the machine registers as a new machine, ``failover_of`` HOST_ID). HOST_ID is the source machine's, and
POINT_ID the recovery point the machine was made from."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

KINDS = ("test", "failover")
Kind = Literal["test", "failover"]
PREFIX = "mobility-failover"
VERSION = "v1"
MARK_FILE = "/etc/mobility/failover.json"  # in the failed-over machine's root filesystem
MAX_MARK_BYTES = 4096  # what a reader reads of MARK_FILE at most
SMBIOS_OEM_TYPE = 11
_SMBIOS = re.compile(rf"{PREFIX}:{VERSION}:(test|failover):([0-9a-f-]{{36}}):([0-9a-f-]{{36}})")


class MarkInvalid(ValueError):
    """A mark of ours that does not parse (a string or file that claims to be one and is not well-formed)."""


def _uuid(value: object, name: str) -> str:
    if not isinstance(value, str) or len(value) != 36:
        raise MarkInvalid(f"{name} is not a UUID")
    try:
        parsed = uuid.UUID(value)
    except ValueError as e:
        raise MarkInvalid(f"{name} is not a UUID") from e
    if str(parsed) != value:
        raise MarkInvalid(f"{name} is not a UUID in canonical form")
    return value


def _time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 << 32:
        raise MarkInvalid(f"{name} is not a time")
    return float(value)


@dataclass(frozen=True)
class FailoverMark:
    kind: Kind
    host_id: str  # the source machine
    point_id: str
    point_created: float = 0.0  # when the point was cut (the file carries it; the SMBIOS string does not)
    marked_at: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MarkInvalid(f"kind must be one of {', '.join(KINDS)}")
        _uuid(self.host_id, "host_id")
        _uuid(self.point_id, "point_id")

    def smbios(self) -> str:
        """The OEM string (SMBIOS type 11) a hypervisor passes."""
        return f"{PREFIX}:{VERSION}:{self.kind}:{self.host_id}:{self.point_id}"

    def qemu_smbios(self) -> str:
        """QEMU's option value for it: ``-smbios type=11,value=...`` (the string holds no comma)."""
        return f"type={SMBIOS_OEM_TYPE},value={self.smbios()}"

    @staticmethod
    def from_smbios(text: str) -> FailoverMark | None:
        """The mark an OEM string carries; None when the string is not ours (other software's OEM strings are
        normal); MarkInvalid when it claims to be ours and is not well-formed."""
        if not text.startswith(PREFIX + ":"):
            return None
        m = _SMBIOS.fullmatch(text)
        if m is None:
            raise MarkInvalid(f"{text[:120]!r} is not a {PREFIX} string of version {VERSION}")
        kind: Kind = "test" if m.group(1) == "test" else "failover"
        return FailoverMark(kind, _uuid(m.group(2), "host_id"), _uuid(m.group(3), "point_id"))

    def to_json(self) -> dict[str, Any]:
        return {
            "mark": PREFIX,
            "version": 1,
            "kind": self.kind,
            "host_id": self.host_id,
            "point_id": self.point_id,
            "point_created": self.point_created,
            "marked_at": self.marked_at,
        }

    def file_text(self) -> str:
        """What `failover` writes to MARK_FILE."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @staticmethod
    def from_file_text(data: bytes) -> FailoverMark:
        """MARK_FILE's content (at most MAX_MARK_BYTES), or MarkInvalid."""
        if len(data) > MAX_MARK_BYTES:
            raise MarkInvalid(f"{MARK_FILE} is larger than {MAX_MARK_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise MarkInvalid(f"{MARK_FILE} is not JSON") from e
        if not isinstance(doc, dict) or doc.get("mark") != PREFIX or doc.get("version") != 1:
            raise MarkInvalid(f"{MARK_FILE} is not a version 1 {PREFIX} mark")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise MarkInvalid(f"kind must be one of {', '.join(KINDS)}")
        return FailoverMark(
            "test" if kind == "test" else "failover",
            _uuid(doc.get("host_id"), "host_id"),
            _uuid(doc.get("point_id"), "point_id"),
            _time(doc.get("point_created", 0), "point_created"),
            _time(doc.get("marked_at", 0), "marked_at"),
        )


def oem_strings(raw: bytes) -> list[str]:
    """The strings of one SMBIOS type 11 structure as the kernel shows it (``/sys/firmware/dmi/entries/11-N/raw``):
    the formatted part (type, length, handle, count), then the string set, each NUL-terminated, ending with a second
    NUL. Malformed or foreign structures give what can be read of them, never an exception."""
    if len(raw) < 5 or raw[0] != SMBIOS_OEM_TYPE or raw[1] < 5 or raw[1] > len(raw):
        return []
    count = raw[4]
    strings = raw[raw[1] :].split(b"\0")
    return [s.decode("utf-8", "replace") for s in strings[:count] if s]
