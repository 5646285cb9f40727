"""A BATCH frame on the process server (protocol version 2): its records verified in the verify pool, one job per
frame. A whole chunk is checked as a CHUNK frame is (decompressed by a bounded reader, hashed); a delta is rebuilt
from exactly the base it names, and kept only if the rebuilt chunk has the hash the agent computed from the disk.

Where a base comes from, in order: zeros (the zero chunk's hash); a chunk of this stream not acknowledged yet (the
frame that carried it is still in the pipeline or the committer's queue: ``deps``, the futures of the earlier
batches that made chunks of that hash, which the FIFO pool started before this one); the store. A delta whose base is
nowhere (collected, a corrupt pack) or whose rebuilt chunk does not have its hash (a write the agent's sub-block map
did not show yet) is refused: nothing of it is kept, the agent is told (REFUSED) and sends the chunk whole. A rebuilt
chunk is kept as any chunk (content-addressed, deduplicated), compressed with zstd level 1 when that shrinks it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import zstandard

from agent.faults import fault_point
from agent.replication.chunks import chunk_hash, zero_hash, zeros
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import Codec, Record, mask_spans
from server.errors import ChunkCorrupt
from server.process.store import ChunkPut

Decompress = Callable[[bytes | memoryview, int, str], bytes]  # (zstd frame, its size, where) -> what it holds
ReadBase = Callable[[bytes, int], bytes | None]  # (hash, length) -> the chunk's bytes from the store, or None

INCOMPRESSIBLE_RUN = 8  # rebuilt chunks in a row zstd could not shrink: then only one in PROBE_EVERY is tried
PROBE_EVERY = 16


@dataclass(frozen=True)
class BatchResult:
    seq: int
    puts: list[ChunkPut]  # what to keep, in record order
    refused: list[int]  # positions of the deltas not applied


_threads = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_threads, "cctx", None)
    if c is None:
        c = _threads.cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    return c


def _worth_compressing(disk_key: int) -> bool:
    runs: dict[int, int] = getattr(_threads, "runs", {})
    _threads.runs = runs
    run = runs.get(disk_key, 0)
    if run < INCOMPRESSIBLE_RUN:
        return True
    runs[disk_key] = run + 1
    return (run - INCOMPRESSIBLE_RUN) % PROBE_EVERY == PROBE_EVERY - 1


def _shrank(disk_key: int, shrank: bool) -> None:
    runs: dict[int, int] = getattr(_threads, "runs", {})
    _threads.runs = runs
    runs[disk_key] = 0 if shrank else min(runs.get(disk_key, 0) + 1, INCOMPRESSIBLE_RUN)


def raw_of(put: ChunkPut, decompress: Decompress) -> bytes | memoryview:
    """A verified chunk's raw bytes."""
    if put.codec is Codec.ZERO:
        return zeros(put.raw_len)
    if put.codec is Codec.ZSTD:
        return decompress(put.data, put.raw_len, f"chunk {put.index}")
    return put.data


def verify_batch(
    disk_key: int,
    chunk_size: int,
    seq: int,
    records: list[Record],
    deps: dict[bytes, Future[BatchResult]],
    read_base: ReadBase,
    decompress: Decompress,
) -> BatchResult:
    """In the verify pool: every record of batch ``seq`` checked or rebuilt (ChunkCorrupt for a whole chunk that does
    not match its hash: the stream fails, as for a CHUNK frame)."""
    fault_point("process.verify", seq=seq)  # the suite makes verification slow here
    puts: list[ChunkPut] = []
    refused: list[int] = []
    mine: dict[bytes, ChunkPut] = {}  # this batch's chunks so far: a later record may build on an earlier one
    for position, r in enumerate(records):
        where = f"chunk {r.index} (sequence {seq}, record {position})"
        put = (
            _rebuilt(disk_key, chunk_size, seq, r, mine, deps, read_base, decompress, where)
            if r.delta
            else _whole(disk_key, seq, r, decompress, where)
        )
        if put is None:
            refused.append(position)
            continue
        puts.append(put)
        mine[put.hash] = put
    return BatchResult(seq, puts, refused)


def _whole(disk_key: int, seq: int, r: Record, decompress: Decompress, where: str) -> ChunkPut:
    if r.codec is Codec.ZERO:
        if r.hash != zero_hash(r.size):
            raise ChunkCorrupt(f"a zero {where} claims a non-zero hash")
        return ChunkPut(disk_key, r.index, r.hash, Codec.ZERO, r.size, b"", seq)
    payload = r.payload  # a view of the frame: kept as it is, never copied
    data = decompress(payload, r.size, where) if r.codec is Codec.ZSTD else payload
    if chunk_hash(data) != r.hash:
        raise ChunkCorrupt(f"{where} does not match its hash")
    if r.hash == zero_hash(r.size):
        return ChunkPut(disk_key, r.index, r.hash, Codec.ZERO, r.size, b"", seq)
    return ChunkPut(disk_key, r.index, r.hash, r.codec, r.size, payload, seq)


def _rebuilt(
    disk_key: int,
    chunk_size: int,
    seq: int,
    r: Record,
    mine: dict[bytes, ChunkPut],
    deps: dict[bytes, Future[BatchResult]],
    read_base: ReadBase,
    decompress: Decompress,
    where: str,
) -> ChunkPut | None:
    spans = mask_spans(r.mask, r.size, chunk_size)
    raw = sum(n for _, n in spans)
    blocks = decompress(bytes(r.payload), raw, where) if r.codec is Codec.DELTA_ZSTD else r.payload
    base = _base(r.base, r.size, mine, deps, read_base, decompress)
    if base is None:
        return None
    chunk = bytearray(base)
    at = 0
    for start, n in spans:
        chunk[start : start + n] = blocks[at : at + n]
        at += n
    if chunk_hash(chunk) != r.hash:
        return None
    if r.hash == zero_hash(r.size):
        return ChunkPut(disk_key, r.index, r.hash, Codec.ZERO, r.size, b"", seq)
    data = bytes(chunk)
    if _worth_compressing(disk_key):
        packed = _compressor().compress(data)
        _shrank(disk_key, len(packed) < len(data))
        if len(packed) < len(data):
            return ChunkPut(disk_key, r.index, r.hash, Codec.ZSTD, r.size, packed, seq)
    return ChunkPut(disk_key, r.index, r.hash, Codec.RAW, r.size, data, seq)


def _base(
    digest: bytes,
    size: int,
    mine: dict[bytes, ChunkPut],
    deps: dict[bytes, Future[BatchResult]],
    read_base: ReadBase,
    decompress: Decompress,
) -> bytes | memoryview | None:
    """The base chunk's bytes, from exactly the chunk of that hash (and that size), or None when it is not here."""
    if digest == zero_hash(size):
        return zeros(size)
    found = mine.get(digest)
    if found is None and digest in deps:
        try:
            earlier = deps[digest].result()
        except (MobilityError, CancelledError):
            earlier = None  # that batch failed (its stream with it) or the server stops: not a base
        if earlier is not None:
            found = next((p for p in earlier.puts if p.hash == digest), None)
    try:
        if found is not None and found.raw_len == size:
            return raw_of(found, decompress)
        return read_base(digest, size)
    except MobilityError:
        return None  # damaged where it was kept: the chunk comes whole
