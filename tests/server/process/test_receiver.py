"""server/process/receiver.py's committer: nothing of a stream is committed after one of its batches was refused."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from agent.shared.replication_wire import Codec
from server.errors import StoreFull
from server.process.receiver import Committer, _Stream
from server.process.store import ChunkPut, DiskRow, PointPut


class Store:
    """A store whose first commit finds the disk full (a later, smaller batch would fit)."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.calls = 0

    def commit(self, items: Sequence[ChunkPut | PointPut]) -> list[Exception | None]:
        self.calls += 1
        if self.calls == 1:
            raise StoreFull("full")
        self.committed += [i.seq for i in items]
        return [None] * len(items)


def put(seq: int) -> ChunkPut:
    return ChunkPut(1, seq, bytes(32), Codec.ZERO, 4096, b"", seq)


def test_frames_after_a_refused_batch_are_not_committed_before_the_stream_fails() -> None:
    loop = asyncio.new_event_loop()
    try:
        store = Store()
        committer = Committer(store)  # type: ignore[arg-type]
        writer: Any = type("W", (), {"is_closing": lambda self: True, "close": lambda self: None})()
        stream = _Stream("h", DiskRow(1, "h", "/dev/sdb", 1 << 20, 4096, 0), loop, writer)
        other = _Stream("g", DiskRow(2, "g", "/dev/sdb", 1 << 20, 4096, 0), loop, writer)
        committer._commit([(stream, put(1)), (stream, put(2))])  # refused: the disk is full
        committer._commit([(stream, put(3)), (other, put(4))])  # the stream's fail() has not run on its loop yet
        assert store.committed == [4]  # frame 3 would have made the durable sequence cover 1 and 2
    finally:
        loop.close()
