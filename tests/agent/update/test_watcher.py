"""The upgrade watcher's own decisions that need no daemon, repository or server (the rest is in
tests/integration/test_updates.py): a move the server withdrew before the switch is dropped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.installed import InstallRecord, save_install_record
from agent.update.state import Phase, TargetRecord, UpgradeRecord, load_record, save_record, save_target, unfinished
from agent.update.watcher import Updater

JOB = "6f1c8a52-41a7-4d47-9d0c-2c4f1e0a9b11"
OTHER = "0b6a1d5e-55f2-4c3b-8f0e-7a9c2d4e6f10"


def never(seconds: float) -> None:
    """The watcher's sleep here: it has no reason to wait (one that goes on with the move waits to report it)."""
    raise AssertionError(f"the watcher waited {seconds} s: it went on with the move")


@pytest.mark.parametrize(
    "target",
    [None, TargetRecord("0.1.0", None, True), TargetRecord("0.1.2", OTHER)],
    ids=["withdrawn", "pinned-where-it-runs", "another-move"],
)
def test_a_move_the_server_no_longer_names_is_dropped_before_the_switch(
    tmp_path: Path, target: TargetRecord | None
) -> None:
    """A watcher that resumes a download (postponed for a repository that refused it, say) after the server ended
    the move (the rollout halted, or the machine was out of its wave's time and pinned where it runs) drops it:
    nothing is fetched or switched, and the record ends, so that no daemon starts a watcher for it again."""
    paths = Paths(tmp_path)
    save_install_record(paths, InstallRecord("0.1.0", "DEBIAN12", "/opt/mobility"))
    save_record(paths, UpgradeRecord("0.1.0", "0.1.1", JOB, Phase.FETCHING, time.time() - 600, resumes=3))
    save_target(paths, target)
    result = Updater(paths, never).run()
    record = load_record(paths)
    assert record is not None and record.phase is Phase.FAILED and not unfinished(record)
    assert record.outcome is not None and "no longer names 0.1.1" in record.outcome.message
    assert result.state == "nothing to do" and not (tmp_path / "opt/mobility/versions/0.1.1").exists()


def test_a_move_the_server_still_names_is_resumed(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    save_install_record(paths, InstallRecord("0.1.0", "DEBIAN12", "/opt/mobility"))
    save_record(paths, UpgradeRecord("0.1.0", "0.1.1", JOB, Phase.FETCHING, time.time() - 600, resumes=3))
    save_target(paths, TargetRecord("0.1.1", JOB))
    Updater(paths, never).run(stop_before=Phase.FETCHING)
    record = load_record(paths)
    assert record is not None and record.phase is Phase.FETCHING and record.resumes == 4
