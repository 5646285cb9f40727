"""agent/replication/points.py without devices: the pre-copy bound, and that the daemon is told "frozen" only
while filesystems are frozen (not during a pre-copy that may last a minute, when its status must keep going)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.paths import Paths
from agent.replication import points
from agent.replication.dirtymap import DirtyMap
from agent.replication.points import Freezer, cut_point


def replicator(dirty_chunks: int) -> Any:
    dirty = DirtyMap(100_000, now=0.0)
    dirty.mark(0, dirty_chunks - 1, now=0.0)
    device = SimpleNamespace(name="/dev/sdb")
    return SimpleNamespace(
        state="CONTINUOUS", need_sweep=False, device=device, dirty=dirty, geometry=SimpleNamespace(chunk_size=65536)
    )


def test_no_freeze_when_the_pre_copy_cannot_catch_up(tmp_path: Path) -> None:
    calls: list[bool] = []
    busy = replicator(points.FREEZE_LIMIT_BYTES // 65536 + 10)
    result = cut_point([busy], tracer=None, paths=Paths(tmp_path), precopy_timeout=0.2, frozen=calls.append)  # type: ignore[arg-type]
    assert not result.ok and result.error == "REPL-POINT-FAILED" and "no freeze" in (result.message or "")
    assert calls == []  # the daemon's status went on being written through the whole pre-copy


def test_a_disk_not_in_continuous_gets_no_point(tmp_path: Path) -> None:
    r = replicator(1)
    r.state = "RESYNCING"
    result = cut_point([r], tracer=None, paths=Paths(tmp_path))  # type: ignore[arg-type]
    assert not result.ok and "/dev/sdb" in (result.message or "")


def test_the_watchdog_thaws_whatever_happens() -> None:
    freezer = Freezer([], limit=0.1)
    freezer.freeze()
    freezer._done.wait(2)
    assert freezer.thawed and not freezer.thaw()  # thawed by the watchdog, not in time by us
