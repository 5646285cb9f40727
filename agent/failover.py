"""Whether this machine is a failover of a protected machine: a recovery point of it, booted.

A failed-over machine carries the source's whole disk: its registration, its key, its replication state. It must never
speak as the source: a test failover (`mobility-server test-failover --boot`) must leave the source's record and
replica untouched, and after a real failover the machine is a new one, registered `failover_of` the source.

It learns what it is from outside, never by guessing from its disks (an image of a point looks exactly like the
source after a reboot):

- the hypervisor hands it an SMBIOS OEM string (type 11), as `test-failover --boot` does for its VM and as an
  operator's hypervisor can for a failed-over VM (QEMU `-smbios type=11,value=...`, libvirt `<oemStrings>`):
  ``mobility-test-failover:<point ID>`` for a test, ``mobility-failover:<point ID>`` for a real failover;
- or the image carries the same line in ``/etc/mobility/failover`` (written into the image by whoever prepared it).

The first sight is recorded in ``/var/lib/mobility/failover.json`` (this module owns it), with the host ID of the
registration found in the image (the source): a real failover stays one on its next boots whatever its hypervisor
says, and once it has registered as itself the record names that identity too."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from agent.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

TEST_PREFIX = "mobility-test-failover:"
REAL_PREFIX = "mobility-failover:"
MARKER = "/etc/mobility/failover"
DMI_ENTRIES = "/sys/firmware/dmi/entries"
MAX_ENTRY = 64 * 1024  # an SMBIOS structure is far smaller
MAX_RECORD = 64 * 1024
MAX_OEM_ENTRIES = 16  # type 11 structures looked at (11-0, 11-1, ...)
_HOST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what this agent stored: a host ID


@dataclass(frozen=True)
class Signal:
    """What the hypervisor or the image says: a test or a real failover, of which point."""

    test: bool
    point_id: str
    source: str  # where it was read: "smbios" or the marker's path

    @property
    def kind(self) -> str:
        return "test" if self.test else "failover"


@dataclass(frozen=True)
class Failover:
    """This machine as a failover: of which machine and point, since when, and (a real failover, once registered)
    the identity it registered as."""

    test: bool
    point_id: str
    source_host: str | None  # the registration found in the image: the machine failed over (None: none was there)
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
        point = _point_id(doc.get("point_id"))
        source, registered = doc.get("source_host"), doc.get("registered_as")
        for value in (source, registered):
            if value is not None and not (isinstance(value, str) and _HOST_ID.fullmatch(value)):
                raise ValueError(f"not a host ID: {value!r}")
        seen = doc.get("seen")
        if point is None or not isinstance(seen, (int, float)):
            raise ValueError("a failover record without its point or time")
        return Failover(doc["kind"] == "test", point, source, float(seen), registered)


def _point_id(value: object) -> str | None:
    """A point ID in canonical UUID form (what agents make), else None."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        return value if str(uuid.UUID(value)) == value else None
    except ValueError:
        return None


def parse_signal(text: str, source: str) -> Signal | None:
    """One OEM string or marker line, if it is a failover signal with a valid point ID (pure)."""
    text = text.strip()
    for prefix, test in ((TEST_PREFIX, True), (REAL_PREFIX, False)):
        if text.startswith(prefix):
            point = _point_id(text[len(prefix) :])
            return Signal(test, point, source) if point is not None else None
    return None


def oem_strings(raw: bytes) -> list[str]:
    """The strings of one SMBIOS type 11 structure as the kernel exposes it (entries/11-N/raw): a formatted part of
    ``raw[1]`` bytes (type, length, handle, count), then NUL-terminated strings ending with an empty one (pure)."""
    if len(raw) < 5 or raw[0] != 11 or raw[1] < 5 or raw[1] > len(raw):
        return []
    found = []
    for chunk in raw[raw[1] :].split(b"\0"):
        if not chunk:
            break
        found.append(chunk.decode("latin-1"))
    return found[: raw[4]]


def _sys_dir(paths: Paths) -> Path:
    return paths.resolve("/sys") if paths.root != paths.root.parent else Path("/sys")


def read_signal(paths: Paths) -> Signal | None:
    """The failover signal this machine is given, if any: the hypervisor's OEM strings first, then the marker file.
    Unreadable or malformed entries are no signal (a machine is never taken for a failover by a stray string)."""
    entries = _sys_dir(paths) / DMI_ENTRIES.removeprefix("/sys/")
    for n in range(MAX_OEM_ENTRIES):
        try:
            _, raw = read_small_file(entries / f"11-{n}" / "raw", MAX_ENTRY)
        except (OSError, NotSmallRegularFile):
            break
        for text in oem_strings(raw):
            found = parse_signal(text, "smbios")
            if found is not None:
                return found
    try:
        _, data = read_small_file(paths.resolve(MARKER), 4096)
    except (OSError, NotSmallRegularFile):
        return None
    for line in data.decode("latin-1").splitlines():
        found = parse_signal(line, MARKER)
        if found is not None:
            return found
    return None


def load_failover(paths: Paths) -> Failover | None:
    try:
        return Failover.from_json(json.loads(read_small_file(paths.failover_record, MAX_RECORD)[1]))
    except (OSError, NotSmallRegularFile, ValueError):
        return None  # none, or damaged: the signal decides again


def save_failover(paths: Paths, failover: Failover) -> None:
    atomic_write(paths.failover_record, json.dumps(failover.to_json(), indent=2).encode() + b"\n", 0o600)


def detect(paths: Paths, now: float, source_host: str | None) -> Failover | None:
    """This machine as a failover, or None: the record kept from an earlier start, or the signal seen now (recorded
    at once, with ``source_host``, the host ID of the registration found in the image). A signal for another point
    than the record's replaces it: a point of a failed-over machine that registered as itself (and was protected in
    turn) is a failover of that machine."""
    kept = load_failover(paths)
    signal = read_signal(paths)
    if signal is None or (kept is not None and (kept.point_id, kept.test) == (signal.point_id, signal.test)):
        return kept
    found = Failover(signal.test, signal.point_id, source_host, now)
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
    "parse_signal",
    "read_signal",
    "registered",
    "save_failover",
    "speaks_as_source",
]
