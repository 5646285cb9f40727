"""agent/replication/dirtymap.py: bounded, round-robin, and the lag it knows without a timestamp per chunk."""

from __future__ import annotations

from agent.replication.dirtymap import BLOCK, GENERATIONS, DirtyMap


def test_marks_are_taken_once_in_order_from_the_cursor() -> None:
    m = DirtyMap(10_000, now=0.0)
    m.mark(5, 7, now=0.1)
    m.mark(9000, 9000, now=0.2)
    m.mark(6, 6, now=0.3)  # already dirty: still one chunk
    assert m.dirty == 4
    assert [i for i, _ in m.take(2)] == [5, 6]
    assert [i for i, _ in m.take(10)] == [7, 9000]
    assert m.dirty == 0 and m.take(10) == [] and m.oldest() is None


def test_the_cursor_wraps_so_a_hot_region_cannot_starve_the_rest() -> None:
    m = DirtyMap(3 * BLOCK, now=0.0)
    m.mark(2 * BLOCK + 1, 2 * BLOCK + 1, now=0.0)
    m.mark(1, 1, now=0.0)
    assert [i for i, _ in m.take(1)] == [1]
    m.mark(0, 0, now=0.0)  # behind the cursor: comes after the chunk ahead of it
    assert [i for i, _ in m.take(1)] == [2 * BLOCK + 1]
    assert [i for i, _ in m.take(1)] == [0]


def test_the_lag_is_the_age_of_the_oldest_change_still_dirty() -> None:
    m = DirtyMap(100, now=0.0)
    m.mark(1, 1, now=0.5)
    m.mark(2, 2, now=3.0)
    m.mark(1, 1, now=5.0)  # written again before it was sent: its oldest change still waits
    assert m.oldest() == 0.0  # the generation that started at 0 holds chunk 1
    taken = dict(m.take(1))
    assert taken == {1: 0.0}
    assert m.oldest() == 3.0


def test_generations_wrap_and_keep_the_oldest_start() -> None:
    m = DirtyMap(1000, now=0.0)
    m.mark(0, 0, now=0.0)
    for t in range(1, GENERATIONS + 5):
        m.mark(t % 1000, t % 1000, now=float(t))
    assert m.oldest() == 0.0  # chunk 0 is still dirty since t=0, through the wrap
    assert m.dirty == GENERATIONS + 5


def test_clear_forgets_a_range_and_memory_is_bounded_by_the_chunk_count() -> None:
    m = DirtyMap(1 << 20, now=0.0)
    m.mark_all(now=1.0)
    m.clear(10, (1 << 20) - 11)
    assert [i for i, _, _ in m.take_all()] == [*range(10), *range((1 << 20) - 10, 1 << 20)]
    assert m.nbytes < 3.1 * (1 << 20)  # a byte and a 16-bit sub-block mask per chunk, whatever the disk size


def test_writes_mark_the_sub_blocks_they_touch_across_chunk_edges_and_in_part() -> None:
    m = DirtyMap(4, now=0.0, chunk_size=65536)
    m.mark_bytes([(65536 - 4096, 8192)], now=0.1)  # a 8 KiB write straddling chunks 0 and 1
    m.mark_bytes([(2 * 65536 + 512, 512)], now=0.2)  # one sector inside sub-block 0 of chunk 2
    m.mark_bytes([(3 * 65536 + 4096 - 512, 1024)], now=0.3)  # two sectors across sub-blocks 0 and 1 of chunk 3
    taken = {i: mask for i, _, mask in m.take_masked(10)}
    assert taken == {0: 1 << 15, 1: 1, 2: 1, 3: 0b11}
    assert m.pending_bytes() == 0 and m.dirty == 0


def test_sub_blocks_add_up_and_a_whole_chunk_mark_covers_every_one() -> None:
    m = DirtyMap(2, now=0.0, chunk_size=65536)
    m.mark_bytes([(0, 4096), (8192, 4096), (0, 4096)], now=0.1)
    assert m.pending_bytes() == 8192 and m.dirty == 1 and m.marked_bytes == 8192
    m.mark(1, 1, now=0.2)
    assert m.pending_bytes() == 8192 + 65536
    assert m.masks_of(0, 2) == [0b101, 0xFFFF]  # a peek: nothing cleared
    assert [(i, mask) for i, _, mask in m.take_masked(1)] == [(0, 0b101)]
    m.mark_bytes([(4096, 100)], now=0.3)  # marked after it was taken: a reader that already read it sees it
    assert m.masks_of(0, 1) == [0b10]


def test_larger_chunks_have_sixteen_larger_sub_blocks() -> None:
    m = DirtyMap(1, now=0.0, chunk_size=1 << 20)
    assert m.block == 65536
    m.mark_bytes([(65536 * 3 + 10, 4096)], now=0.0)
    assert m.masks_of(0, 1) == [1 << 3] and m.pending_bytes() == 65536
