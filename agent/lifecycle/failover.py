"""Whether this machine is a failover of a protected machine: a recovery point of it, booted.

A failed-over machine carries the source's whole disk: its registration, its key, its replication state. It must never
speak as the source: a test failover (`mobility-server test-failover --boot`) must leave the source's record and
replica untouched, and after a real failover the machine is a new one, registered `failover_of` the source.

It learns what it is from the server's mark, never by guessing from its disks (an image of a point looks exactly like
the source after a reboot). The mark (docs/replication.md, "A failed-over machine knows it is one") names the kind
(``test`` or ``failover``), the source's host ID and the point, and comes two ways:

- an SMBIOS OEM string (type 11) the hypervisor hands the machine, ``mobility-failover:v1:KIND:HOST_ID:POINT_ID``:
  `test-failover --boot` gives its VM one, and an operator's hypervisor can give a failed-over VM one (QEMU's
  ``-smbios type=11,value=...``, libvirt's ``<oemStrings>``); the kernel shows it in
  /sys/firmware/dmi/entries/11-*/raw;
- ``/etc/mobility/failover.json`` in the machine's root filesystem, which `failover` writes into the images it makes.

The first sight is recorded in /var/lib/mobility/failover.json (this module owns it): a real failover stays one on its
next boots whatever its hypervisor says, and once registered as itself the record names that identity too."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from agent.host.paths import Paths
from agent.shared.failover_mark import MARK_FILE, MAX_MARK_BYTES, FailoverMark, MarkInvalid, oem_strings
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

DMI_ENTRIES = "/sys/firmware/dmi/entries"
MAX_ENTRY = 64 * 1024  # an SMBIOS structure is far smaller
MAX_RECORD = 64 * 1024
MAX_OEM_ENTRIES = 16  # type 11 structures looked at (11-0, 11-1, ...)
_HOST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what this agent stored: a host ID


@dataclass(frozen=True)
class Signal:
    """What the mark says: a test or a real failover, of which machine and point, and where it was read."""

    test: bool
    host_id: str
    point_id: str
    source: str  # "smbios" or MARK_FILE


@dataclass(frozen=True)
class Failover:
    """This machine as a failover: of which machine and point, since when, and (a real failover, once registered)
    the identity it registered as."""

    test: bool
    point_id: str
    source_host: str | None  # the machine failed over
    seen: float
    registered_as: str | None = None

    @property
    def kind(self) -> str:
        return "test" if self.test else "failover"

    def describe(self) -> str:
        what = "a test failover" if self.test else "a failover"
        return f"{what} of {self.source_host or 'an unregistered machine'} at point {self.point_id}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "point_id": self.point_id,
            "source_host": self.source_host,
            "seen": self.seen,
            "registered_as": self.registered_as,
        }

    @staticmethod
    def from_json(doc: object) -> Failover:
        if not isinstance(doc, dict) or doc.get("kind") not in ("test", "failover"):
            raise ValueError("not a failover record")
        point = _canonical_uuid(doc.get("point_id"))
        source, registered = doc.get("source_host"), doc.get("registered_as")
        for value in (source, registered):
            if value is not None and not (isinstance(value, str) and _HOST_ID.fullmatch(value)):
                raise ValueError(f"not a host ID: {value!r}")
        seen = doc.get("seen")
        if point is None or not isinstance(seen, (int, float)):
            raise ValueError("a failover record without its point or time")
        return Failover(doc["kind"] == "test", point, source, float(seen), registered)


def _canonical_uuid(value: object) -> str | None:
    """A host or point ID in canonical UUID form (what the server and agents make), else None."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        return value if str(uuid.UUID(value)) == value else None
    except ValueError:
        return None


def parse_smbios(text: str) -> Signal | None:
    """One OEM string, if it is a well-formed mark (pure). Other software's strings, and ours malformed, are none."""
    try:
        mark = FailoverMark.from_smbios(text.strip())
    except MarkInvalid:
        return None
    return None if mark is None else Signal(mark.kind == "test", mark.host_id, mark.point_id, "smbios")


def parse_mark_file(data: bytes) -> Signal | None:
    """The mark file's content, if it is a well-formed version 1 mark (pure)."""
    try:
        mark = FailoverMark.from_file_text(data)
    except (MarkInvalid, RecursionError):
        return None
    return Signal(mark.kind == "test", mark.host_id, mark.point_id, MARK_FILE)


def _sys_dir(paths: Paths) -> Path:
    return paths.resolve("/sys") if paths.root != paths.root.parent else Path("/sys")


def read_signal(paths: Paths) -> Signal | None:
    """The mark this machine is given, if any: the hypervisor's OEM strings first (what this boot is), then the mark
    file in its root filesystem. Unreadable or malformed marks are none: a machine is never taken for a failover by
    a stray string."""
    entries = _sys_dir(paths) / DMI_ENTRIES.removeprefix("/sys/")
    for n in range(MAX_OEM_ENTRIES):
        try:
            _, raw = read_small_file(entries / f"11-{n}" / "raw", MAX_ENTRY)
        except (OSError, NotSmallRegularFile):
            break
        for text in oem_strings(raw):
            found = parse_smbios(text)
            if found is not None:
                return found
    try:
        _, data = read_small_file(paths.resolve(MARK_FILE), MAX_MARK_BYTES)
    except (OSError, NotSmallRegularFile):
        return None
    return parse_mark_file(data)


def load_failover(paths: Paths) -> Failover | None:
    try:
        return Failover.from_json(json.loads(read_small_file(paths.failover_record, MAX_RECORD)[1]))
    except (OSError, NotSmallRegularFile, ValueError):
        return None  # none, or damaged: the signal decides again


def save_failover(paths: Paths, failover: Failover) -> None:
    atomic_write(paths.failover_record, json.dumps(failover.to_json(), indent=2).encode() + b"\n", 0o600)


def detect(paths: Paths, now: float) -> Failover | None:
    """This machine as a failover, or None: the record kept from an earlier start, or the mark seen now (recorded at
    once). A mark of another point than the record's replaces it: a point of a failed-over machine that registered as
    itself (and was protected in turn) is a failover of that machine."""
    kept = load_failover(paths)
    signal = read_signal(paths)
    if signal is None or (kept is not None and (kept.point_id, kept.test) == (signal.point_id, signal.test)):
        return kept
    found = Failover(signal.test, signal.point_id, signal.host_id, now)
    save_failover(paths, found)
    return found


def registered(paths: Paths, failover: Failover, host_id: str) -> Failover:
    """A real failover registered as ``host_id``: recorded, so that it speaks as itself from now on."""
    done = replace(failover, registered_as=host_id)
    save_failover(paths, done)
    return done


def speaks_as_source(failover: Failover | None, host_id: str | None) -> bool:
    """Whether the registration on disk (``host_id``) is one this failover must not use: any in a test (nothing of
    a test reaches the server), the source's in a real failover (until it registers as itself). Then the agent
    neither heartbeats, replicates, renews nor upgrades with it (pure)."""
    if failover is None or host_id is None:
        return False
    return failover.test or host_id == failover.source_host


__all__ = [
    "Failover",
    "Signal",
    "detect",
    "load_failover",
    "oem_strings",
    "parse_mark_file",
    "parse_smbios",
    "read_signal",
    "registered",
    "save_failover",
    "speaks_as_source",
]
