"""The replication wire format: binary frames on the per-disk stream, the JSON messages they carry, and the
replication parts of the heartbeat (what the server asks the agent to protect; what the agent reports).

Both sides import this module, as they import agent/shared/wire.py (and like it, it needs only the standard
library). Every message a peer sends is parsed once, here, into
a typed value; a field of the wrong type, size or shape is a ProtocolError naming it.

A stream is one TLS connection per protected disk, authenticated by the machine's client certificate. The agent
opens it with HELLO; the process server answers WELCOME with the last sequence number it has made durable (the
agent resends what follows), then, if asked, the replica's chunk hashes (HASHES frames up to HASHES_END) for a
checksum resync. CHUNK frames carry one chunk each: sequence, byte offset, raw length, BLAKE3 hash of the raw data,
and the payload (zstd level 1, raw when that does not shrink it, or nothing for a zero chunk). POINT closes a
recovery point after the chunks before it. The server answers ACK (every frame up to that sequence is durable)
and ERROR (then closes).

Version 2 (both sides say theirs: HELLO and WELCOME) adds BATCH: many chunks in one frame, one sequence number, one
acknowledgement; each record is a chunk as above or a **delta**: only the sub-blocks of the chunk that changed
(a 16-bit mask of the chunk's sixteen sub-blocks, 4 KiB each in 64 KiB chunks), the hash of the whole new chunk, and
the hash of the base the agent believes the replica holds for that chunk. The server rebuilds the chunk from exactly
that base and keeps it only if the result has the new hash. Every batch is answered CHECKED as soon as it is verified
(before its commit and its ACK), with the record positions it refused, if any; the agent sends those chunks whole
(and, for a batch a WELCOME settled before its CHECKED was read, every delta of it). A
point's capture waits for that answer of its residual, not for its commit. An agent of version 1 sends
CHUNK frames to a server of version 2; an agent of version 2 sends CHUNK frames to a server that says nothing of its
version (version 1)."""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from agent.shared.fields import Fields, WireError

HASH_SIZE = 32  # BLAKE3 (agent/replication/chunks.py says why)
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # a frame's payload stays bounded: past 16 TiB a disk gets more chunks instead

HEADER = struct.Struct("<2sBBIQQI4x32s")  # magic, kind, flags, payload length, seq, offset, raw size, hash
MAGIC = b"MR"
PROTOCOL_VERSION = 2
BATCH_VERSION = 2  # the first version that sends and takes BATCH and CHECKED
MAX_PAYLOAD = MAX_CHUNK_SIZE + 1024  # a chunk that zstd grew is sent raw: payload <= chunk size
MAX_BATCH = MAX_CHUNK_SIZE + 64 * 1024  # a batch's payload: one chunk of the largest size with its record, or many
MAX_BATCH_RECORDS = 4096
MAX_BATCH_RAW = 2 * MAX_CHUNK_SIZE  # the chunks a batch makes, rebuilt: what the server holds for it at most
SUB_BLOCKS = 16  # a delta's mask: a chunk in sixteen sub-blocks (4 KiB in a 64 KiB chunk)
MIN_SUB_BLOCK = 4096
# One record of a batch: chunk index, codec, 0, sub-block mask, raw size, payload length, hash, base hash. The payload
# follows each record.
RECORD = struct.Struct("<IBBHII32s32s")
MAX_JSON = 64 * 1024
HASHES_PER_FRAME = 8192  # 256 KiB of hashes per HASHES frame

# Every number on the wire has a bound, checked where it is parsed, so that nothing downstream (the store's 64-bit
# integers, a listing that turns a time into a date) ever meets one it cannot hold.
MAX_SEQ = (1 << 62) - 1  # a stream's sequence numbers: far beyond any stream's life, inside SQLite's signed 64 bits
MAX_DISK_SIZE = 1 << 56  # bytes: a disk's size, a frame's offset
EARLIEST = 0.0  # times (a point's creation, the last point a machine reports): 1970 ...
LATEST = float(1 << 32)  # ... to 2106, the last second an unsigned 32-bit time holds
MAX_SECONDS = float(1 << 32)  # durations (lag, ETA): 136 years
MAX_RATE = float(1 << 40)  # bytes per second (1 TiB/s)
MAX_FREEZE_MS = 3_600_000.0  # a freeze window: an hour (the agent's watchdog thaws after 10 s)

STATES = ("INITIAL_SYNC", "CONTINUOUS", "RESYNC_REQUIRED", "RESYNCING", "PAUSED", "STALLED")
CONSISTENCY = ("crash-consistent", "app-consistent", "raw-idle", "raw-busy")
_STRENGTH = ("raw-busy", "raw-idle", "crash-consistent", "app-consistent")  # weakest first
MAX_DISKS = 64

_DISK = re.compile(r"/dev/[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,126}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ERROR_ID = re.compile(r"[A-Z][A-Z0-9-]{0,63}")
_POLICY = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_HOST = re.compile(r"[A-Za-z0-9.:-]{1,253}")


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol (the peer is closed with REPL-PROTOCOL)."""


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    CHUNK = 3
    POINT = 4
    ACK = 5
    ERROR = 6
    HASHES = 7
    HASHES_END = 8
    BATCH = 9  # version 2: many chunks and deltas; ``size`` holds the number of records
    CHECKED = 10  # version 2, server -> agent: batch ``seq`` verified; the u32 record positions it did not apply


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    ZERO = 2  # no payload: the chunk is all zero bytes
    DELTA = 3  # in a batch only: the sub-blocks of the mask, raw, one after the other
    DELTA_ZSTD = 4  # ... as one zstd frame that declares their size


WHOLE = (Codec.RAW, Codec.ZSTD, Codec.ZERO)  # what a CHUNK frame and the store hold


@dataclass(frozen=True)
class Header:
    kind: Kind
    flags: int
    length: int
    seq: int = 0
    offset: int = 0
    size: int = 0
    hash: bytes = bytes(HASH_SIZE)

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.kind, self.flags, self.length, self.seq, self.offset, self.size, self.hash)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        magic, kind, flags, length, seq, offset, size, digest = HEADER.unpack(data)
        if magic != MAGIC:
            raise ProtocolError("not a replication frame (bad magic)")
        try:
            k = Kind(kind)
        except ValueError as e:
            raise ProtocolError(f"unknown frame kind {kind}") from e
        limit = MAX_BATCH if k is Kind.BATCH else MAX_PAYLOAD if k in (Kind.CHUNK, Kind.HASHES) else MAX_JSON
        if length > limit:
            raise ProtocolError(f"{k.name} frame of {length} bytes is larger than allowed")
        if seq > MAX_SEQ:
            raise ProtocolError(f"{k.name} frame with sequence {seq}, beyond 2^62")
        if offset > MAX_DISK_SIZE:
            raise ProtocolError(f"{k.name} frame at offset {offset}, beyond 2^56")
        if size > MAX_CHUNK_SIZE:
            raise ProtocolError(f"{k.name} frame of {size} bytes, more than a chunk")
        if k is Kind.BATCH and not (0 < size <= MAX_BATCH_RECORDS and flags == 0):
            raise ProtocolError(f"a batch of {size} records (1 to {MAX_BATCH_RECORDS})")
        if k is Kind.CHUNK:
            if flags not in WHOLE:
                raise ProtocolError(f"unknown chunk codec {flags}")
            if not 0 < size <= MAX_CHUNK_SIZE:
                raise ProtocolError(f"chunk of {size} bytes")
            if flags == Codec.ZERO and length:
                raise ProtocolError("a zero chunk carries no payload")
            if flags == Codec.RAW and length != size:
                raise ProtocolError("a raw chunk's payload is its size")
        return cls(k, flags, length, seq, offset, size, bytes(digest))


def frame(kind: Kind, payload: bytes = b"", **fields: Any) -> bytes:
    return Header(kind, fields.pop("flags", 0), len(payload), **fields).pack() + payload


def json_frame(kind: Kind, doc: dict[str, Any], seq: int = 0) -> bytes:
    return frame(kind, json.dumps(doc, separators=(",", ":")).encode(), seq=seq)


def sub_block(chunk_size: int) -> int:
    """The bytes one bit of a delta's mask stands for: 4 KiB, or a sixteenth of a chunk larger than 64 KiB."""
    return max(MIN_SUB_BLOCK, chunk_size // SUB_BLOCKS)


def full_mask(length: int, chunk_size: int) -> int:
    """The mask of every sub-block a chunk of ``length`` bytes has (the last chunk of a disk may have fewer)."""
    return (1 << -(-length // sub_block(chunk_size))) - 1


def mask_spans(mask: int, length: int, chunk_size: int) -> list[tuple[int, int]]:
    """The (offset, length) in the chunk of each sub-block of ``mask``, in order (the last may be shorter)."""
    block = sub_block(chunk_size)
    spans = []
    for b in range(SUB_BLOCKS):
        if mask >> b & 1:
            start = b * block
            spans.append((start, min(block, length - start)))
    return spans


@dataclass(frozen=True)
class Record:
    """One chunk of a BATCH frame: whole (RAW, ZSTD, ZERO) or a delta (DELTA, DELTA_ZSTD) over ``base``."""

    index: int
    codec: Codec
    size: int  # the chunk's raw length
    hash: bytes  # of the whole chunk, as it is after this record
    payload: bytes | memoryview
    mask: int = 0  # a delta's sub-blocks
    base: bytes = bytes(HASH_SIZE)  # a delta's base: the chunk the agent believes the replica holds

    @property
    def delta(self) -> bool:
        return self.codec in (Codec.DELTA, Codec.DELTA_ZSTD)

    def delta_size(self, chunk_size: int) -> int:
        """The bytes of a delta's sub-blocks, raw."""
        return sum(n for _, n in mask_spans(self.mask, self.size, chunk_size))

    def pack(self) -> bytes:
        return RECORD.pack(self.index, self.codec, 0, self.mask, self.size, len(self.payload), self.hash, self.base)


def batch_payload(records: list[Record]) -> list[bytes | memoryview]:
    """A BATCH frame's payload, as pieces to send one after the other (no copy of the chunks here)."""
    parts: list[bytes | memoryview] = []
    for r in records:
        parts.append(r.pack())
        if r.payload:
            parts.append(r.payload)
    return parts


def parse_batch(payload: bytes, count: int, chunk_size: int, chunks: int) -> list[Record]:
    """The ``count`` records of a BATCH payload for a disk of ``chunks`` chunks of ``chunk_size`` (the last may be
    shorter: the caller checks each record's size against it). Every field is bounded here; the payloads must fill the
    frame exactly."""
    view = memoryview(payload)
    out: list[Record] = []
    at = raw = 0
    for _ in range(count):
        if at + RECORD.size > len(view):
            raise ProtocolError("a batch ends inside a record")
        index, codec, zero, mask, size, length, digest, base = RECORD.unpack_from(view, at)
        at += RECORD.size
        if zero or index >= chunks or not 0 < size <= chunk_size:
            raise ProtocolError(f"batch record for chunk {index} of {size} bytes is not a chunk of this disk")
        try:
            c = Codec(codec)
        except ValueError as e:
            raise ProtocolError(f"unknown chunk codec {codec}") from e
        if length > len(view) - at:
            raise ProtocolError("a batch record's payload runs past the frame")
        if c is Codec.ZERO and length:
            raise ProtocolError("a zero chunk carries no payload")
        if c is Codec.RAW and length != size:
            raise ProtocolError("a raw chunk's payload is its size")
        if c in (Codec.DELTA, Codec.DELTA_ZSTD):
            if not mask or mask & ~full_mask(size, chunk_size):
                raise ProtocolError(f"a delta of chunk {index} with sub-block mask {mask:#06x}")
            if c is Codec.DELTA and length != sum(n for _, n in mask_spans(mask, size, chunk_size)):
                raise ProtocolError(f"a delta of chunk {index} whose payload is not its sub-blocks")
        elif mask or any(base):
            raise ProtocolError("only a delta has a sub-block mask and a base")
        raw += size
        if raw > MAX_BATCH_RAW:
            raise ProtocolError(f"a batch of more than {MAX_BATCH_RAW} bytes of chunks")
        out.append(Record(index, c, size, bytes(digest), view[at : at + length], mask, bytes(base)))
        at += length
    if at != len(view):
        raise ProtocolError(f"{len(view) - at} bytes after a batch's last record")
    return out


def weakest_consistency(labels: Sequence[str]) -> str:
    """What a point of several disks is: the weakest of its disks' labels (a label not known here counts as weakest;
    the agent makes the labels, the process server combines what each disk closed with)."""
    return min(labels, key=lambda c: _STRENGTH.index(c) if c in _STRENGTH else -1)


def parse_json(payload: bytes, what: str) -> Any:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"{what} is not JSON") from e


def _int(f: Fields, key: str, low: int, high: int) -> int:
    value = f.doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise WireError(f"{f.where}.{key} must be an integer from {low} to {high}")
    return value


def _number(f: Fields, key: str, low: float, high: float) -> float:
    value = f.number(key)
    if not low <= value <= high:
        raise WireError(f"{f.where}.{key} must be a number from {low:g} to {high:g}")
    return value


def _optional_number(f: Fields, key: str, low: float, high: float) -> float | None:
    return _number(f, key, low, high) if f.doc.get(key) is not None else None


def _within(value: float | None, low: float, high: float) -> float | None:
    """What a sender puts on the wire for a number it measured: inside the bounds its peer checks (None when it is
    not a number at all), so that a strange measurement never gets a whole heartbeat refused."""
    if value is None or not math.isfinite(value):
        return None
    return min(max(float(value), low), high)


def disk_name(value: str, where: str = "disk") -> str:
    """A protected disk as the operator named it: /dev/..., printable, no '..' (WireError otherwise)."""
    if not _DISK.fullmatch(value) or ".." in value.split("/") or "//" in value:
        raise WireError(f"{where} must be a block device path under /dev (like /dev/sdb), not {value[:60]!r}")
    return value


def _guard(cls_name: str, data: Any, parse: Any) -> Any:
    try:
        return parse(data)
    except WireError as e:
        raise ProtocolError(f"{cls_name}: {e}") from e


# Stream messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    disk: str
    size: int
    chunk_size: int
    want_hashes: bool = False
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "want_hashes": self.want_hashes,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Hello:
        def parse(d: Any) -> Hello:
            f = Fields(d, "hello")
            return cls(
                disk=disk_name(f.text("disk", 128), "hello.disk"),
                size=_int(f, "size", 1, MAX_DISK_SIZE),
                chunk_size=_int(f, "chunk_size", 4096, MAX_CHUNK_SIZE),
                want_hashes=f.flag("want_hashes"),
                version=_int(f, "version", 1, 1000),
            )

        return _guard("HELLO", doc, parse)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Welcome:
    acked_seq: int  # every frame up to this sequence is durable on the process server
    known: bool  # the server holds a replica of this disk with this geometry (else it starts empty)
    version: int = PROTOCOL_VERSION  # the server's (a server of version 1 does not say: 1)

    def to_json(self) -> dict[str, Any]:
        return {"acked_seq": self.acked_seq, "known": self.known, "version": self.version}

    @classmethod
    def from_json(cls, doc: Any) -> Welcome:
        def parse(d: Any) -> Welcome:
            f = Fields(d, "welcome")
            version = _int(f, "version", 1, 1000) if "version" in f.doc else 1
            return cls(_int(f, "acked_seq", 0, MAX_SEQ), f.flag("known"), version)

        return _guard("WELCOME", doc, parse)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PointClose:
    """Closes a recovery point on one disk's stream: the chunks sent before it are the disk at the freeze."""

    point_id: str
    created: float
    root: str  # hex root hash over the disk's chunk hashes, computed on the source
    consistency: str
    disks: tuple[str, ...]  # every disk of the machine's point (the point is complete when each has closed)
    freeze_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "point_id": self.point_id,
            "created": self.created,
            "root": self.root,
            "consistency": self.consistency,
            "disks": list(self.disks),
            "freeze_ms": self.freeze_ms,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PointClose:
        def parse(d: Any) -> PointClose:
            f = Fields(d, "point")
            point_id = f.text("point_id", 36)
            try:
                if str(uuid.UUID(point_id)) != point_id:
                    raise ValueError(point_id)
            except ValueError as e:
                raise WireError("point.point_id is not a UUID in canonical form") from e
            disks = f.items("disks", MAX_DISKS)
            if not disks or not all(isinstance(x, str) for x in disks):
                raise WireError("point.disks must be a non-empty list of disk names")
            return cls(
                point_id=point_id,
                created=_number(f, "created", EARLIEST, LATEST),
                root=f.text("root", 64, pattern=_HEX64),
                consistency=f.text("consistency", 32, choices=CONSISTENCY),
                disks=tuple(disk_name(x, "point.disks[]") for x in disks),
                freeze_ms=_optional_number(f, "freeze_ms", 0.0, MAX_FREEZE_MS),
            )

        return _guard("POINT", doc, parse)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StreamError:
    code: str
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fix": self.fix}

    @classmethod
    def from_json(cls, doc: Any) -> StreamError:
        def parse(d: Any) -> StreamError:
            f = Fields(d, "error")
            return cls(f.text("code", 64, pattern=_ERROR_ID), f.text("message", 2000), f.text("fix", 1000))

        return _guard("ERROR", doc, parse)  # type: ignore[no-any-return]


# Heartbeat: what to protect (server -> agent) ------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    rpo_seconds: float = 900.0
    interval_seconds: float = 300.0
    bandwidth_bps: int = 0  # 0: no cap
    retention: int = 24  # recovery points kept (the last N)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rpo_seconds": self.rpo_seconds,
            "interval_seconds": self.interval_seconds,
            "bandwidth_bps": self.bandwidth_bps,
            "retention": self.retention,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Policy:
        f = Fields(doc, "policy")
        interval = f.number("interval_seconds")
        rpo = f.number("rpo_seconds")
        if not 1 <= interval <= 7 * 86400 or not 1 <= rpo <= 7 * 86400:
            raise WireError("policy intervals must be between 1 s and 7 days")
        return cls(
            name=f.text("name", 32, pattern=_POLICY),
            rpo_seconds=rpo,
            interval_seconds=interval,
            bandwidth_bps=_int(f, "bandwidth_bps", 0, 1 << 40),
            retention=_int(f, "retention", 1, 10000),
        )


@dataclass(frozen=True)
class ProcessAddress:
    host: str | None  # None: the configuration server's own host, as the agent reaches it
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    @classmethod
    def from_json(cls, doc: Any) -> ProcessAddress:
        f = Fields(doc, "process")
        host = f.optional_text("host", 253, pattern=_HOST)
        return cls(host, _int(f, "port", 1, 65535))


@dataclass(frozen=True)
class Protection:
    """What the server asks the agent to protect: named disks or all of them, a policy, and where to send."""

    disks: tuple[str, ...]
    all_disks: bool
    policy: Policy
    process: ProcessAddress
    paused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "disks": list(self.disks),
            "all_disks": self.all_disks,
            "policy": self.policy.to_json(),
            "process": self.process.to_json(),
            "paused": self.paused,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Protection:
        f = Fields(doc, "protection")
        disks = f.items("disks", MAX_DISKS)
        if not all(isinstance(d, str) for d in disks):
            raise WireError("protection.disks must be a list of disk names")
        return cls(
            disks=tuple(disk_name(d, "protection.disks[]") for d in disks),
            all_disks=f.flag("all_disks"),
            policy=Policy.from_json(f.doc.get("policy")),
            process=ProcessAddress.from_json(f.doc.get("process")),
            paused=f.flag("paused"),
        )


# Heartbeat: how replication goes (agent -> server) --------------------------------------------------------------


@dataclass(frozen=True)
class DiskReport:
    disk: str
    state: str
    size: int = 0
    bytes_left: int = 0
    lag_seconds: float | None = None  # age of the oldest change not yet acknowledged (the RPO right now)
    throughput_bps: float = 0.0
    eta_seconds: float | None = None
    last_point: float | None = None
    error: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "state": self.state,
            "size": self.size,
            "bytes_left": self.bytes_left,
            "lag_seconds": _within(self.lag_seconds, 0.0, MAX_SECONDS),
            "throughput_bps": _within(self.throughput_bps, 0.0, MAX_RATE) or 0.0,
            "eta_seconds": _within(self.eta_seconds, 0.0, MAX_SECONDS),
            "last_point": _within(self.last_point, EARLIEST, LATEST),
            "error": self.error,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, doc: Any) -> DiskReport:
        f = Fields(doc, "replication.disks[]")
        return cls(
            disk=disk_name(f.text("disk", 128), "replication.disks[].disk"),
            state=f.text("state", 16, choices=STATES),
            size=_int(f, "size", 0, MAX_DISK_SIZE) if "size" in f.doc else 0,
            bytes_left=_int(f, "bytes_left", 0, MAX_DISK_SIZE) if "bytes_left" in f.doc else 0,
            lag_seconds=_optional_number(f, "lag_seconds", 0.0, MAX_SECONDS),
            throughput_bps=_number(f, "throughput_bps", 0.0, MAX_RATE),
            eta_seconds=_optional_number(f, "eta_seconds", 0.0, MAX_SECONDS),
            last_point=_optional_number(f, "last_point", EARLIEST, LATEST),
            error=f.optional_text("error", 64, pattern=_ERROR_ID),
            detail=f.optional_text("detail", 500),
        )


@dataclass(frozen=True)
class NextPoint:
    """How the next recovery point looks from here: the freeze it would need now, the rates that decide it, and why
    it waits when it does (the agent postpones a point whose freeze would be too long)."""

    expected_freeze_ms: float
    dirty_bps: float  # bytes of sub-blocks the writes change per second
    send_bps: float  # bytes of sub-blocks replication takes to send per second
    postponed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "expected_freeze_ms": _within(self.expected_freeze_ms, 0.0, MAX_FREEZE_MS) or 0.0,
            "dirty_bps": _within(self.dirty_bps, 0.0, MAX_RATE) or 0.0,
            "send_bps": _within(self.send_bps, 0.0, MAX_RATE) or 0.0,
            "postponed": self.postponed[:300] if self.postponed else None,
        }

    @classmethod
    def from_json(cls, doc: Any) -> NextPoint:
        f = Fields(doc, "replication.next_point")
        return cls(
            _number(f, "expected_freeze_ms", 0.0, MAX_FREEZE_MS),
            _number(f, "dirty_bps", 0.0, MAX_RATE),
            _number(f, "send_bps", 0.0, MAX_RATE),
            f.optional_text("postponed", 300),
        )


@dataclass(frozen=True)
class ReplicationReport:
    disks: tuple[DiskReport, ...] = ()
    last_point: float | None = None
    last_point_id: str | None = None
    points: int = 0
    freeze_ms: float | None = None  # the last point's freeze window
    next_point: NextPoint | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "disks": [d.to_json() for d in self.disks],
            "last_point": _within(self.last_point, EARLIEST, LATEST),
            "last_point_id": self.last_point_id,
            "points": self.points,
            "freeze_ms": _within(self.freeze_ms, 0.0, MAX_FREEZE_MS),
            "next_point": self.next_point.to_json() if self.next_point else None,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ReplicationReport:
        f = Fields(doc, "replication")
        return cls(
            disks=tuple(DiskReport.from_json(d) for d in f.items("disks", MAX_DISKS)),
            last_point=_optional_number(f, "last_point", EARLIEST, LATEST),
            last_point_id=f.optional_text("last_point_id", 36, pattern=re.compile(r"[0-9a-f-]{36}")),
            points=_int(f, "points", 0, 1 << 40) if "points" in f.doc else 0,
            freeze_ms=_optional_number(f, "freeze_ms", 0.0, MAX_FREEZE_MS),
            next_point=NextPoint.from_json(f.doc["next_point"]) if f.doc.get("next_point") is not None else None,
        )
