"""The dirty map of one protected disk: which chunks changed since they were last read for the process server, which
of their sixteen sub-blocks, and since when (pure, thread-safe).

One byte per chunk and a 16-bit mask of its sub-blocks (4 KiB each in a 64 KiB chunk; a sixteenth of a larger chunk,
agent/shared/replication_wire.py ``sub_block``), and the chunk size grows with the disk (agent/replication/chunks.py),
so the map is at most 3 MiB whatever the disk size, and marking a write costs the same whatever its place; the mask
lets a changed chunk travel as its changed sub-blocks only (a delta). A summary of dirty chunks per block of 4096 lets
the sender find work without scanning clean stretches. The byte holds a generation (1-255; 0 is clean): generations
advance every second and remember when they started, so the age of the oldest change still waiting (the lag) is
known without a timestamp per chunk. When the 255 generations wrap, the oldest is merged into the next one, keeping
the older start."""

from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Iterable

from agent.shared.replication_wire import SUB_BLOCKS, sub_block

BLOCK = 4096  # chunks per summary entry
FULL = (1 << SUB_BLOCKS) - 1  # every sub-block of a chunk
GENERATIONS = 255
_NONZERO = re.compile(rb"[^\x00]")


class DirtyMap:
    def __init__(self, count: int, *, now: float = 0.0, tick: float = 1.0, chunk_size: int = 65536) -> None:
        self.count = count
        self.tick = tick
        self.chunk_size = chunk_size
        self.block = sub_block(chunk_size)
        self.bits = bytearray(count)
        self.masks = array("H", bytes(2 * count))
        self.blocks = array("I", bytes(4 * (-(-count // BLOCK))))
        self.gen_count = array("I", bytes(4 * 256))
        self.gen_start = array("d", bytes(8 * 256))
        self.gen = 1
        self.gen_start[1] = now
        self.dirty = 0
        self.dirty_blocks = 0  # sub-blocks marked in dirty chunks
        self.marked_bytes = 0  # sub-block bytes that became dirty, ever (the dirtying rate is its slope)
        self.taken_bytes = 0  # ... and that were taken to be sent (the sending rate, in the same bytes)
        self.events = 0  # write events applied (for telling an idle raw disk from a busy one)
        self.last_event = 0.0
        self.cursor = 0
        self.lock = threading.Lock()

    # Marking (the tracer's thread) ------------------------------------------------------------------------------

    def mark(self, first: int, last: int, now: float) -> None:
        """Chunks ``first``..``last`` (inclusive) changed at ``now``, every sub-block of them."""
        first, last = max(first, 0), min(last, self.count - 1)
        if first > last:
            return
        with self.lock:
            self._advance(now)
            self.events += 1
            self.last_event = now
            for i in range(first, last + 1):
                self._set(i, FULL)

    def mark_masked(self, index: int, mask: int) -> None:
        """Chunk ``index`` changed in the sub-blocks of ``mask`` (a dirty map saved at a clean stop, read again)."""
        if 0 <= index < self.count and mask:
            with self.lock:
                self._set(index, mask & FULL)

    def mark_bytes(self, writes: Iterable[tuple[int, int]], now: float) -> None:
        """Writes of (byte offset, length) completed by ``now``: their chunks, and in each the sub-blocks they touched
        (a write of part of a sub-block, or across a chunk's edge, marks every sub-block it touches)."""
        cs, block, count = self.chunk_size, self.block, self.count
        with self.lock:
            self._advance(now)
            for start, length in writes:
                if length <= 0:
                    continue
                self.events += 1
                end = start + length
                first, last = max(start // cs, 0), min((end - 1) // cs, count - 1)
                for i in range(first, last + 1):
                    base = i * cs
                    lo = (max(start, base) - base) // block
                    hi = (min(end, base + cs) - 1 - base) // block
                    self._set(i, ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))
            self.last_event = now

    def _set(self, i: int, mask: int) -> None:
        old = self.masks[i]
        new = mask & ~old
        if new:
            self.masks[i] = old | mask
            n = new.bit_count()
            self.dirty_blocks += n
            self.marked_bytes += n * self.block
        if self.bits[i]:
            return  # already dirty: it keeps the time of its oldest change not yet sent
        gen = self.gen
        self.blocks[i // BLOCK] += 1
        self.dirty += 1
        self.bits[i] = gen
        self.gen_count[gen] += 1

    def mark_all(self, now: float) -> None:
        self.mark(0, self.count - 1, now)

    def _advance(self, now: float) -> None:
        if now - self.gen_start[self.gen] < self.tick:
            return
        nxt = self.gen % GENERATIONS + 1
        if self.gen_count[nxt]:
            # Wrapped onto a generation still in use: fold it into the one after it (the next oldest), which
            # inherits the older start, so the lag stays right.
            after = nxt % GENERATIONS + 1
            table = bytearray(range(256))
            table[nxt] = after
            self.bits[:] = self.bits.translate(table)
            had = self.gen_count[after]
            self.gen_count[after] += self.gen_count[nxt]
            self.gen_start[after] = min(self.gen_start[after], self.gen_start[nxt]) if had else self.gen_start[nxt]
            self.gen_count[nxt] = 0
        self.gen = nxt
        self.gen_start[nxt] = now

    # Taking work (the disk's sender) ----------------------------------------------------------------------------

    def take(self, limit: int) -> list[tuple[int, float]]:
        """Up to ``limit`` dirty chunks, cleared, as (index, when first changed); round-robin from a cursor so a
        hot region cannot starve the rest of the disk."""
        return [(i, since) for i, since, _ in self.take_masked(limit)]

    def take_masked(self, limit: int) -> list[tuple[int, float, int]]:
        """As ``take``, with each chunk's sub-block mask: (index, when first changed, mask)."""
        out: list[tuple[int, float, int]] = []
        with self.lock:
            if not self.dirty:
                return out
            nblocks = len(self.blocks)
            start_block = self.cursor // BLOCK
            for step in range(nblocks + 1):
                b = (start_block + step) % nblocks
                if not self.blocks[b]:
                    continue
                lo = b * BLOCK
                if step == 0:
                    lo = max(lo, self.cursor)
                hi = min((b + 1) * BLOCK, self.count)
                for m in _NONZERO.finditer(self.bits, lo, hi):
                    i = m.start()
                    mask = self.masks[i]
                    out.append((i, self._clear(i), mask))
                    if len(out) >= limit:
                        self.cursor = i + 1 if i + 1 < self.count else 0
                        return out
            self.cursor = 0
        return out

    def take_all(self) -> list[tuple[int, float, int]]:
        return self.take_masked(self.count)

    def masks_of(self, first: int, n: int) -> list[int]:
        """The sub-blocks of chunks ``first``..``first + n - 1`` marked since they were taken (not cleared: a reader
        that read after such a write must send those sub-blocks too, and they stay to be sent again)."""
        with self.lock:
            return list(self.masks[first : first + n])

    def clear(self, first: int, last: int) -> None:
        """Forget changes of chunks ``first``..``last``: they are about to be read (a sweep reads them anyway)."""
        with self.lock:
            if not self.dirty:
                return
            for m in _NONZERO.finditer(self.bits, max(first, 0), min(last, self.count - 1) + 1):
                self._clear(m.start())

    def _clear(self, i: int) -> float:
        gen = self.bits[i]
        self.bits[i] = 0
        n = self.masks[i].bit_count()
        self.dirty_blocks -= n
        self.taken_bytes += n * self.block
        self.masks[i] = 0
        self.gen_count[gen] -= 1
        self.blocks[i // BLOCK] -= 1
        self.dirty -= 1
        return self.gen_start[gen]

    # Reading the state ------------------------------------------------------------------------------------------

    def pending_bytes(self) -> int:
        """The bytes of the sub-blocks still to send: what a delta of each dirty chunk carries."""
        return self.dirty_blocks * self.block

    def oldest(self) -> float | None:
        """When the oldest change still in the map was first seen (None when clean)."""
        with self.lock:
            if not self.dirty:
                return None
            return min(self.gen_start[g] for g in range(1, 256) if self.gen_count[g])

    @property
    def nbytes(self) -> int:
        return len(self.bits) + 2 * len(self.masks) + self.blocks.itemsize * len(self.blocks) + 12 * 256
