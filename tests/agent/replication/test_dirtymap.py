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
    assert sorted(m.dirty_indexes()) == [*range(10), *range((1 << 20) - 10, 1 << 20)]
    assert m.nbytes < 1.1 * (1 << 20)
