"""The dirty map of one protected disk: which chunks changed since they were last read for the process server, and
since when (pure, thread-safe).

One byte per chunk, and the chunk size grows with the disk (agent/replication/chunks.py), so the map is at most
1 MiB whatever the disk size; a summary of dirty chunks per block of 4096 lets the sender find work without
scanning clean stretches. The byte holds a generation (1-255; 0 is clean): generations advance every second and
remember when they started, so the age of the oldest change still waiting (the lag) is known without a timestamp
per chunk. When the 255 generations wrap, the oldest is merged into the next one, keeping the older start."""

from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Iterator

BLOCK = 4096  # chunks per summary entry
GENERATIONS = 255
_NONZERO = re.compile(rb"[^\x00]")


class DirtyMap:
    def __init__(self, count: int, *, now: float = 0.0, tick: float = 1.0) -> None:
        self.count = count
        self.tick = tick
        self.bits = bytearray(count)
        self.blocks = array("I", bytes(4 * (-(-count // BLOCK))))
        self.gen_count = array("I", bytes(4 * 256))
        self.gen_start = array("d", bytes(8 * 256))
        self.gen = 1
        self.gen_start[1] = now
        self.dirty = 0
        self.events = 0  # write events applied (for telling an idle raw disk from a busy one)
        self.last_event = 0.0
        self.cursor = 0
        self.lock = threading.Lock()

    # Marking (the tracer's thread) ------------------------------------------------------------------------------

    def mark(self, first: int, last: int, now: float) -> None:
        """Chunks ``first``..``last`` (inclusive) changed at ``now``."""
        first, last = max(first, 0), min(last, self.count - 1)
        if first > last:
            return
        with self.lock:
            self._advance(now)
            self.events += 1
            self.last_event = now
            gen = self.gen
            bits, blocks, counts = self.bits, self.blocks, self.gen_count
            for i in range(first, last + 1):
                if bits[i]:
                    continue  # already dirty: it keeps the time of its oldest change not yet sent
                blocks[i // BLOCK] += 1
                self.dirty += 1
                bits[i] = gen
                counts[gen] += 1

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
        out: list[tuple[int, float]] = []
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
                    out.append((i, self._clear(i)))
                    if len(out) >= limit:
                        self.cursor = i + 1 if i + 1 < self.count else 0
                        return out
            self.cursor = 0
        return out

    def take_all(self) -> list[tuple[int, float]]:
        return self.take(self.count)

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
        self.gen_count[gen] -= 1
        self.blocks[i // BLOCK] -= 1
        self.dirty -= 1
        return self.gen_start[gen]

    # Reading the state ------------------------------------------------------------------------------------------

    def oldest(self) -> float | None:
        """When the oldest change still in the map was first seen (None when clean)."""
        with self.lock:
            if not self.dirty:
                return None
            return min(self.gen_start[g] for g in range(1, 256) if self.gen_count[g])

    def dirty_indexes(self) -> Iterator[int]:
        """Every dirty chunk (a snapshot; for tests and diagnostics)."""
        with self.lock:
            found = [m.start() for m in _NONZERO.finditer(self.bits)]
        return iter(found)

    @property
    def nbytes(self) -> int:
        return len(self.bits) + self.blocks.itemsize * len(self.blocks) + 12 * 256
