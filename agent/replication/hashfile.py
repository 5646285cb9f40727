"""The per-disk hash file in the state directory: the BLAKE3 hash of every chunk as the replica will hold it once
the frames in flight are acknowledged. It lives on disk, not in memory (32 bytes per chunk: 8 MiB for a 16 GiB
disk), read and written with pread/pwrite; the root hash of a point is computed from it on the source.

It is trusted only while the agent runs: every start (and every lost event) resynchronises, which refills it from
the process server's replica hashes and the disk's own content."""

from __future__ import annotations

import os
from pathlib import Path

from agent.replication.chunks import Geometry, RootHasher, zero_hash
from agent.shared.replication_wire import HASH_SIZE

_STEP = 32768  # hashes per read when computing a root (1 MiB)


class HashFile:
    def __init__(self, path: Path, geometry: Geometry) -> None:
        self.path = path
        self.geometry = geometry
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        want = geometry.count * HASH_SIZE
        if os.fstat(self.fd).st_size != want:
            self.reset()

    def reset(self) -> None:
        """Every chunk as zeros (what an empty replica holds)."""
        g = self.geometry
        os.ftruncate(self.fd, 0)
        block = zero_hash(g.chunk_size) * _STEP
        for start in range(0, g.count, _STEP):
            n = min(_STEP, g.count - start)
            os.pwrite(self.fd, block[: n * HASH_SIZE], start * HASH_SIZE)
        last = g.count - 1
        if g.length(last) != g.chunk_size:
            os.pwrite(self.fd, zero_hash(g.length(last)), last * HASH_SIZE)

    def read(self, first: int, n: int) -> bytes:
        data = os.pread(self.fd, n * HASH_SIZE, first * HASH_SIZE)
        if len(data) != n * HASH_SIZE:
            raise OSError(5, f"{self.path}: short read")
        return data

    def write(self, first: int, hashes: bytes) -> None:
        os.pwrite(self.fd, hashes, first * HASH_SIZE)

    def root(self) -> str:
        """The root hash over every chunk hash, in order (agent/replication/chunks.py RootHasher)."""
        g = self.geometry
        hasher = RootHasher(g)
        for start in range(0, g.count, _STEP):
            hasher.update(self.read(start, min(_STEP, g.count - start)))
        return hasher.hexdigest()

    def close(self) -> None:
        os.close(self.fd)
