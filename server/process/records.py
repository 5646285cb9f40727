"""Point records: what the chunk store's index knows of a closed point, kept beside the packs and manifests so that
the index can be rebuilt from them (``mobility-server store repair``, server/process/repair.py).

One record per point and disk, written and fsynced in the group commit that closes the point on that disk, before
the index row: ``DATA/process/points/<host ID>/<point ID>.<disk>.json``, where ``<disk>`` is a digest of the disk's
name. A record names its machine twice, in its directory and in its contents, and carries a checksum over its
contents: a record is read back only where both names agree and the checksum holds, so that a point of one machine is
never taken for another's, and a damaged record is refused, never half believed.

Pure parsing and formatting here; ``write``, ``remove`` and ``scan`` are the I/O."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.replication.chunks import MAX_CHUNKS, Geometry
from agent.shared.fsutil import fsync_dir
from agent.shared.replication_wire import (
    CONSISTENCY,
    EARLIEST,
    LATEST,
    MAX_CHUNK_SIZE,
    MAX_DISK_SIZE,
    MAX_DISKS,
    MAX_FREEZE_MS,
    MAX_SEQ,
)

FORMAT = 1
MAX_RECORD = 64 * 1024  # a record is a few hundred bytes; a larger file is not one
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FILE = re.compile(r"(?P<point>[0-9a-z-]{1,80})\.(?P<disk>[0-9a-f]{16})\.json")


class RecordInvalid(ValueError):
    """A record file that is not a whole, consistent record (the message says why)."""


@dataclass(frozen=True)
class PointRecord:
    host_id: str
    point_id: str
    created: float
    consistency: str  # the point's, as its first disk closed it
    disks: tuple[str, ...]  # every disk the point names
    freeze_ms: float | None
    disk: str  # the disk this record closes
    size: int
    chunk_size: int
    root: str
    manifest: str
    closed: float
    disk_consistency: str
    gen: int  # the disk's point generation (its order among the disk's points)
    seq: int  # the sequence number of the POINT frame on the disk's stream

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size)

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "host_id": self.host_id,
            "point_id": self.point_id,
            "created": self.created,
            "consistency": self.consistency,
            "disks": list(self.disks),
            "freeze_ms": self.freeze_ms,
            "disk": self.disk,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "root": self.root,
            "manifest": self.manifest,
            "closed": self.closed,
            "disk_consistency": self.disk_consistency,
            "gen": self.gen,
            "seq": self.seq,
        }


def name_part(text: str) -> str:
    """A host or point ID as a file name: itself when it is a UUID in canonical form (every ID the server issues
    and the wire accepts), else a digest of it (pure)."""
    if _UUID.fullmatch(text):
        return text
    return "x-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def disk_part(disk: str) -> str:
    return hashlib.sha256(disk.encode()).hexdigest()[:16]


def relative_path(host_id: str, point_id: str, disk: str) -> Path:
    return Path(name_part(host_id)) / f"{name_part(point_id)}.{disk_part(disk)}.json"


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode(record: PointRecord) -> bytes:
    body = record.body()
    return (json.dumps({**body, "check": _checksum(body)}, sort_keys=True, indent=1) + "\n").encode()


def decode(data: bytes, where: Path) -> PointRecord:
    """The record in ``data``, read from ``where`` (relative to the records' directory): RecordInvalid unless it is
    whole, within bounds and filed under its own machine, point and disk."""
    if len(data) > MAX_RECORD:
        raise RecordInvalid("larger than any record")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordInvalid(f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RecordInvalid("not a record")
    check = doc.pop("check", None)
    if check != _checksum(doc):
        raise RecordInvalid("its checksum does not match its contents")
    if doc.get("format") != FORMAT:
        raise RecordInvalid(f"format {doc.get('format')!r} is not {FORMAT}")
    try:
        record = PointRecord(
            host_id=_text(doc, "host_id", 128),
            point_id=_text(doc, "point_id", 128),
            created=_number(doc, "created", EARLIEST, LATEST),
            consistency=_choice(doc, "consistency"),
            disks=_disks(doc),
            freeze_ms=None if doc.get("freeze_ms") is None else _number(doc, "freeze_ms", 0.0, MAX_FREEZE_MS),
            disk=_text(doc, "disk", 4096),
            size=_int(doc, "size", 1, MAX_DISK_SIZE),
            chunk_size=_int(doc, "chunk_size", 4096, MAX_CHUNK_SIZE),
            root=_hex(doc, "root"),
            manifest=_hex(doc, "manifest"),
            closed=_number(doc, "closed", EARLIEST, LATEST),
            disk_consistency=_choice(doc, "disk_consistency"),
            gen=_int(doc, "gen", 0, MAX_SEQ),
            seq=_int(doc, "seq", 0, MAX_SEQ),
        )
    except KeyError as e:
        raise RecordInvalid(f"{e.args[0]} is missing") from e
    if record.geometry.count > MAX_CHUNKS:
        raise RecordInvalid(f"a disk of {record.geometry.count} chunks")
    if record.disk not in record.disks:
        raise RecordInvalid("its disk is not one the point names")
    if where != relative_path(record.host_id, record.point_id, record.disk):
        raise RecordInvalid(f"filed as {where}, it names machine {record.host_id}, point {record.point_id}")
    return record


def _text(doc: dict[str, Any], key: str, limit: int) -> str:
    value = doc[key]
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise RecordInvalid(f"{key} is not a name")
    return value


def _choice(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if value not in CONSISTENCY:
        raise RecordInvalid(f"{key} {value!r} is not a consistency label")
    return str(value)


def _hex(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise RecordInvalid(f"{key} is not a hash")
    return value


def _int(doc: dict[str, Any], key: str, low: int, high: int) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordInvalid(f"{key} is out of bounds")
    return value


def _number(doc: dict[str, Any], key: str, low: float, high: float) -> float:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordInvalid(f"{key} is not a number")
    if not low <= value <= high:
        raise RecordInvalid(f"{key} is out of bounds")
    return float(value)


def _disks(doc: dict[str, Any]) -> tuple[str, ...]:
    value = doc["disks"]
    if not isinstance(value, list) or not 0 < len(value) <= MAX_DISKS:
        raise RecordInvalid("disks is not a list of disks")
    return tuple(_text({"disk": d}, "disk", 4096) for d in value)


# I/O ------------------------------------------------------------------------------------------------------------


def write(root: Path, record: PointRecord) -> Path:
    """Write the record durably (the file, and every directory made for it, fsynced) before the caller commits the
    index row it backs."""
    path = root / relative_path(record.host_id, record.point_id, record.disk)
    made = [d for d in (root, path.parent) if not d.exists()]
    for d in made:
        d.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode(record))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    for d in made:
        fsync_dir(d.parent)
    return path


def remove(root: Path, host_id: str, point_id: str, disk: str) -> None:
    (root / relative_path(host_id, point_id, disk)).unlink(missing_ok=True)


def sync(root: Path, host_id: str) -> None:
    """Make removals of the machine's records durable."""
    where = root / name_part(host_id)
    if where.is_dir():
        fsync_dir(where)


def scan(root: Path) -> Iterator[tuple[Path, PointRecord | RecordInvalid]]:
    """Every record file under ``root``, in a stable order: its path and the record, or why it is not one. Leftovers
    of a write that never finished (``.*.tmp``) are not records."""
    if not root.is_dir():
        return
    for host_dir in sorted(root.iterdir()):
        if not host_dir.is_dir() or host_dir.is_symlink():
            continue
        for path in sorted(host_dir.iterdir()):
            if path.name.startswith("."):
                continue
            where = path.relative_to(root)
            if not _FILE.fullmatch(path.name) or not path.is_file() or path.is_symlink():
                yield path, RecordInvalid("not a record file")
                continue
            try:
                with path.open("rb") as f:
                    data = f.read(MAX_RECORD + 1)
            except OSError as e:
                yield path, RecordInvalid(f"unreadable: {e.strerror}")
                continue
            try:
                yield path, decode(data, where)
            except RecordInvalid as e:
                yield path, e
