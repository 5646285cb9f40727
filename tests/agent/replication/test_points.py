"""agent/replication/points.py without devices: the pre-copy bound, and that the daemon is told "frozen" only
while filesystems are frozen (not during a pre-copy that may last a minute, when its status must keep going)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.host.paths import Paths
from agent.replication import points
from agent.replication.dirtymap import DirtyMap
from agent.replication.points import Freezer, cut_point


def replicator(dirty_chunks: int, rate: float = 0.0) -> Any:
    dirty = DirtyMap(100_000, now=0.0)
    dirty.mark(0, dirty_chunks - 1, now=0.0)
    device = SimpleNamespace(name="/dev/sdb")
    return SimpleNamespace(
        state="CONTINUOUS",
        need_sweep=False,
        device=device,
        dirty=dirty,
        geometry=SimpleNamespace(chunk_size=65536),
        rate=rate,
        send_bps=rate,
        stream=SimpleNamespace(window_size=0),
    )


def test_no_freeze_when_the_residual_would_take_longer_than_the_freeze_may_last(tmp_path: Path) -> None:
    """The pre-copy stops once the residual stops shrinking (not after its full minute), and a residual that the
    measured capture rate says would keep the filesystems frozen past MAX_FREEZE is not frozen for."""
    calls: list[bool] = []
    busy = replicator(30_000)  # 1.8 GiB changed, and it does not shrink
    rate = points.CaptureRate()
    rate.measured(512 << 20, 2.0)  # a capture of 512 MiB took 2 s: 1.8 GiB would take about 7 s
    started = time.monotonic()
    result = cut_point([busy], tracer=None, paths=Paths(tmp_path), frozen=calls.append, capture_rate=rate)  # type: ignore[arg-type]
    assert time.monotonic() - started < points.PRECOPY_PLATEAU + 2
    assert not result.ok and result.error == "REPL-POINT-FAILED" and "no freeze" in (result.message or "")
    assert "about 7 s" in (result.message or "")
    assert calls == []  # the daemon's status went on being written through the whole pre-copy


def test_before_any_capture_the_freeze_is_foreseen_from_the_sub_blocks_sent_not_the_chunks_acknowledged(
    tmp_path: Path,
) -> None:
    """4 KiB deltas are acknowledged as whole 64 KiB chunks: the acknowledged rate is up to sixteen times what
    replication sends of changed sub-blocks, the residual's own units. The freeze of a residual that stopped shrinking
    is foreseen from the latter (before, a 100 MiB residual looked like a third of a second and was frozen for)."""
    busy = replicator(1_600, rate=200e6)  # 100 MiB of changed sub-blocks; 200 MB/s of chunks acknowledged...
    busy.send_bps = 4e6  # ...for 4 MB/s of sub-blocks sent
    result = cut_point([busy], tracer=None, paths=Paths(tmp_path), capture_rate=points.CaptureRate())  # type: ignore[arg-type]
    assert not result.ok and "no freeze" in (result.message or ""), result
    assert "about 17 s" in (result.message or "")  # 100 MiB at 1.5 x 4 MB/s


def test_the_capture_rate_is_foreseen_from_sending_then_measured() -> None:
    rate = points.CaptureRate()
    assert rate.expect(100 << 20, 0.0) == (100 << 20) / points.MIN_CAPTURE_RATE  # nothing known: the floor
    assert rate.expect(300 << 20, 100e6) == (300 << 20) / 150e6  # faster than the disks send while not frozen
    rate.measured(1 << 20, 10.0)  # too small to say anything
    assert rate.rate is None
    rate.measured(400 << 20, 2.0)
    rate.measured(200 << 20, 2.0)
    assert rate.rate == 0.5 * (200 << 20) / 2.0 + 0.5 * (400 << 20) / 2.0


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


def test_a_filesystem_that_cannot_be_frozen_fails_the_freeze_and_nothing_stays_frozen() -> None:
    """FIFREEZE on a filesystem that does not support it (procfs): REPL-FREEZE-FAILED, and the watchdog is done."""
    import pytest

    from agent.errors import FreezeFailed

    freezer = Freezer(["/proc"], limit=2.0)
    with pytest.raises(FreezeFailed):
        freezer.freeze()
    assert freezer.thawed and freezer.fds == []


def test_a_point_is_cancelled_within_its_bound_in_the_pre_copy(tmp_path: Path) -> None:
    """The agent stops while a point waits for its pre-copy (up to a minute): cancelled, it ends at once."""
    import threading

    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    result = cut_point(
        [replicator(30_000)],
        tracer=None,  # type: ignore[arg-type]
        paths=Paths(tmp_path),
        precopy_timeout=60,
        cancel=cancel,
    )
    assert time.monotonic() - started < 1.5
    assert not result.ok and result.error == "REPL-POINT-FAILED" and "stopping" in (result.message or "")


def test_a_cancelled_point_kills_its_pre_hook_and_still_runs_the_post_hooks(tmp_path: Path) -> None:
    """A pre hook that takes its time (a database flushing) is killed when the agent stops; the post hooks run (the
    application must not stay quiesced), and all of it within CANCEL_SECONDS."""
    import threading

    from agent.replication.devices import BlockDevice

    paths = Paths(tmp_path)
    paths.freeze_dir.mkdir(parents=True)
    posted = tmp_path / "posted"
    hook = paths.freeze_dir / "10-db"
    hook.write_text(f'#!/bin/sh\n[ "$1" = post ] && touch {posted} && exit 0\nsleep 60\n')
    hook.chmod(0o755)
    r = replicator(1)
    r.device = BlockDevice("/dev/nothing", tmp_path / "nothing", 4095, 4095, "nothing-here")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    result = cut_point([r], tracer=None, paths=paths, cancel=cancel)  # type: ignore[arg-type]
    assert time.monotonic() - started < points.CANCEL_SECONDS
    assert not result.ok and "stopping" in (result.message or "")
    assert posted.exists()


def test_the_unit_gives_a_stop_all_the_time_it_can_take_and_thaws_after_it() -> None:
    """systemd kills a daemon still running at TimeoutStopSec: it must cover the longest stop (else a stop during a
    point is unclean and every disk resyncs), and ExecStopPost runs `mobility thaw`, whatever ended the daemon."""
    from agent.daemon.loop import stop_seconds
    from tests.conftest import REPO

    unit = (REPO / "systemd" / "mobility.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    timeout = float(settings["TimeoutStopSec"].removesuffix("s"))
    assert stop_seconds() <= timeout <= stop_seconds() + 10
    assert settings["ExecStopPost"].split() == [settings["ExecStart"].split()[0], "thaw"]


def test_a_point_is_planned_from_the_measured_rates_and_postponed_with_its_reason() -> None:
    """Replication that sends faster than the writes change data will bring a pre-copy down to about a second of
    writes: a point goes ahead. Writes that outpace it leave what is changed now (and more): the point waits, and says
    how long its freeze would be and which rates stop it."""
    rate = points.CaptureRate()
    rate.measured(64 << 20, 0.5)  # captures went at 128 MiB/s
    keeps_up = points.plan_point(900 << 20, dirty_bps=20e6, send_bps=60e6, capture=rate)
    assert keeps_up.postponed is None and keeps_up.expected_freeze_ms < 200  # 20 MB of a second's writes
    behind = points.plan_point(900 << 20, dirty_bps=20e6, send_bps=15e6, capture=rate)
    assert behind.postponed is not None and behind.expected_freeze_ms > points.MAX_FREEZE * 1000
    assert "writes change 20.0 MB/s and replication sends 15.0 MB/s" in behind.postponed
    slow_capture = points.CaptureRate()
    slow_capture.measured(64 << 20, 20.0)  # 3.4 MB/s
    slow = points.plan_point(0, dirty_bps=20e6, send_bps=60e6, capture=slow_capture)
    assert slow.postponed is not None and "would be captured at 3.4 MB/s" in slow.postponed
