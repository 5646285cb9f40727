"""Disks over 1 TiB (root: loop devices): their chunks are 2 MiB and more, larger than a batch of reading, and each
read job still reads, hashes and sends whole chunks. The disks are loop devices over sparse files of 2 TiB and
16 TiB on an XFS of the lab (XFS takes 16 TiB files; ext4 stops just short of it)."""

from __future__ import annotations

import os
import random
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.replication.chunks import chunk_hash, geometry_for, zero_hash
from agent.replication.devices import BlockDevice
from agent.replication.sync import job_bytes, job_chunks, pipeline_depth, read_job, release_readers
from agent.shared.replication_wire import HASH_SIZE, Codec
from scripts.replication_lab import Lab, sh
from tests.conftest import require_root

pytestmark = pytest.mark.integration

TIB = 1 << 40
MIB = 1 << 20


@pytest.mark.parametrize(("size", "chunk"), [(2 * TIB, 2 * MIB), (16 * TIB, 16 * MIB)])
def test_read_job_reads_whole_chunks_of_disks_over_a_tib(tmp_path: Path, size: int, chunk: int) -> None:
    require_root()
    g = geometry_for(size)
    assert g.chunk_size == chunk and job_chunks(g) == 1 and job_bytes(g) == chunk
    assert pipeline_depth(g) * job_bytes(g) <= max(4 * MIB, chunk)  # what waits to be sent stays bounded
    rng = random.Random(size)  # noqa: S311 - test data
    with Lab(tmp_path / "lab") as lab:
        host = lab.disk("host", 400 * MIB, ("xfs",))
        image = host.mounts[0] / "big.img"
        with image.open("wb") as f:
            f.truncate(size)
        first = rng.randbytes(chunk)  # chunk 1, random: sent raw
        text = (b"mobility " * (chunk // 9 + 1))[:chunk]  # the last chunk, compressible
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, first, g.offset(1))
            os.pwrite(fd, text, g.offset(g.count - 1))
            os.fsync(fd)
        finally:
            os.close(fd)
        loop = sh(["losetup", "--find", "--show", str(image)]).stdout.strip()
        lab.defer(f"loop {loop}", lambda: sh(["losetup", "--detach", loop], check=False))
        lab.defer("readers", lambda: release_readers(Path(loop)))  # as the engine does when a disk's replication ends
        st = os.stat(loop)
        device = BlockDevice(loop, Path(loop), os.major(st.st_rdev), os.minor(st.st_rdev), Path(loop).name)
        with ThreadPoolExecutor(1) as pool:  # as the replicator runs them: in the pool, a reader per thread
            jobs = [pool.submit(read_job, device, g, i, 1, None, 0.0) for i in (0, 1, g.count - 1)]
            zero, raw, last = (job.result() for job in jobs)
        assert zero.hashes == zero_hash(chunk) and [c.codec for c in zero.out] == [Codec.ZERO]
        assert raw.hashes == chunk_hash(first) and raw.nbytes == chunk
        assert [(c.index, c.codec, c.payload) for c in raw.out] == [(1, Codec.RAW, first)]
        assert last.hashes == chunk_hash(text) and len(last.hashes) == HASH_SIZE
        assert [(c.index, c.codec, c.size) for c in last.out] == [(g.count - 1, Codec.ZSTD, chunk)]
        known = read_job(device, g, 1, 1, chunk_hash(first), 0.0)  # what the replica has is not sent again
        assert known.out == [] and known.hashes == chunk_hash(first)
        # The readers of this thread and of the pool's (ended) thread let go of the device once its replication
        # ends: nothing of this process holds it open.
        release_readers(Path(loop))
        assert not [fd for fd in os.listdir("/proc/self/fd") if _is_device(f"/proc/self/fd/{fd}", st.st_rdev)]


def _is_device(path: str, rdev: int) -> bool:
    try:
        found = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(found.st_mode) and found.st_rdev == rdev
