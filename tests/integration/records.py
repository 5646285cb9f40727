"""Self-describing records for the failover tests: a writer process that writes them to files on protected
filesystems and logs when each write started and returned, and a checker that holds a failed-over point to what a
crash-consistent point promises.

A record is 512 bytes, written with one pwrite: magic, file tag, sequence number, its own offset, random payload
and a CRC-32 over the rest. Two kinds of file per filesystem: ``append.dat`` (records one after the other) and
``slots.dat`` (records overwriting random slots). Run as a script: ``records.py LOG DIR [DIR ...]`` until SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SIZE = 512
SLOTS = 256
_HEAD = struct.Struct("<4sHQQ")  # magic, file tag, seq, offset
MAGIC = b"MREC"


def encode(tag: int, seq: int, offset: int, rng: random.Random) -> bytes:
    body = _HEAD.pack(MAGIC, tag, seq, offset) + rng.randbytes(SIZE - _HEAD.size - 4)
    return body + struct.pack("<I", zlib.crc32(body))


def decode(data: bytes) -> tuple[int, int, int] | None:
    """(tag, seq, offset) of an intact record; None for zeros; ValueError for anything torn or foreign."""
    if data == bytes(SIZE):
        return None
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    magic, tag, seq, offset = _HEAD.unpack(body[: _HEAD.size])
    if magic != MAGIC or zlib.crc32(body) != crc:
        raise ValueError("torn or foreign record")
    return tag, seq, offset


@dataclass(frozen=True)
class Write:
    file: str  # "<dir index>/append.dat" or "<dir index>/slots.dat"
    offset: int
    seq: int
    start: float
    end: float


def writer(log_path: Path, dirs: list[Path], seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - test data
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    files = {}
    for i, d in enumerate(dirs):
        for name in ("append.dat", "slots.dat"):
            files[f"{i}/{name}"] = os.open(d / name, os.O_RDWR | os.O_CREAT, 0o600)
    next_append = dict.fromkeys((k for k in files if k.endswith("append.dat")), 0)
    seq = 0
    while not stop:
        seq += 1
        key = rng.choice(sorted(files))
        if key.endswith("append.dat"):
            offset = next_append[key]
            next_append[key] += SIZE
        else:
            offset = rng.randrange(SLOTS) * SIZE
        record = encode(zlib.crc32(key.encode()) & 0xFFFF, seq, offset, rng)
        start = time.time()
        os.pwrite(files[key], record, offset)
        if rng.random() < 0.05:
            os.fdatasync(files[key])
        end = time.time()
        os.write(log, f"{key} {offset} {seq} {start:.6f} {end:.6f}\n".encode())
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.004))
    os.close(log)


def read_log(path: Path) -> list[Write]:
    writes = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            writes.append(Write(parts[0], int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4])))
    return writes


def check(mounts: dict[int, Path], writes: list[Write], frozen_at: float, thawed_at: float) -> list[str]:
    """Mismatches between the failed-over filesystems (by dir index) and the writer's log for a point frozen at
    ``frozen_at`` and thawed at ``thawed_at``: every write that returned before the freeze is there, nothing that
    started after the thaw is, and every record is intact and at its own offset."""
    problems: list[str] = []
    by_location: dict[tuple[str, int], list[Write]] = defaultdict(list)
    for w in writes:
        by_location[(w.file, w.offset)].append(w)
    for (key, offset), history in sorted(by_location.items()):
        index = int(key.split("/")[0])
        path = mounts[index] / key.split("/")[1]
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(SIZE)
        except FileNotFoundError:
            data = b""
        before = [w for w in history if w.end < frozen_at]
        possible = {w.seq for w in history if w.start < thawed_at and w.end >= frozen_at}
        if before:
            possible.add(before[-1].seq)
        if len(data) < SIZE:
            if before:
                problems.append(f"{key}@{offset}: missing, seq {before[-1].seq} returned before the freeze")
            continue
        try:
            found = decode(data)
        except ValueError:
            problems.append(f"{key}@{offset}: torn record")
            continue
        if found is None:
            if before:
                problems.append(f"{key}@{offset}: zeros, seq {before[-1].seq} returned before the freeze")
            continue
        _tag, seq, at = found
        if at != offset:
            problems.append(f"{key}@{offset}: record says offset {at}")
        if seq not in possible:
            problems.append(f"{key}@{offset}: seq {seq}, possible {sorted(possible)[-3:]} (before: {len(before)})")
    return problems


if __name__ == "__main__":
    writer(Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]], seed=int(os.environ.get("RECORD_SEED", "15")))
