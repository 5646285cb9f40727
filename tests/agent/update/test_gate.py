"""The health gate, fed the observations a watcher makes: when it commits, when it rolls back, and the false rollbacks
it must never make (the server down, one bad sample, a condition the previous version had too)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from agent.update.gate import Commit, Gate, GateSettings, Observation, RollBack, Verdict, Wait
from agent.update.state import Baseline

SETTINGS = GateSettings(window=60.0, settle=10.0, heartbeat=2.0)
T0 = 1_000.0
NEW = "0.1.1"
REACHABLE = Baseline(reachable=True, heartbeat_seconds=2.0)


def gate(baseline: Baseline = REACHABLE, settings: GateSettings = SETTINGS) -> Gate:
    return Gate(settings, baseline, NEW, restarted_at=T0)


def daemon(at: float, **kw: object) -> Observation:
    """The new version's daemon, started at T0 + 1, as its record shows it at ``at``."""
    base: dict[str, object] = {
        "at": at,
        "running": True,
        "exits": 0,
        "version": NEW,
        "pid": 42,
        "started": T0 + 1,
        "last_heartbeat_ok": at - 0.5,
        "health": "healthy",
        "report_time": at - 0.5,
        "server_reachable": True,
    }
    base.update(kw)
    return Observation(**base)  # type: ignore[arg-type]


def run(g: Gate, observations: Iterator[Observation]) -> tuple[Verdict, float]:
    verdict: Verdict = Wait("nothing seen")
    at = T0
    for o in observations:
        at = o.at
        verdict = g.observe(o)
        if not isinstance(verdict, Wait):
            break
    return verdict, at


def every_second(start: float, end: float, **kw: object) -> Iterator[Observation]:
    t = start
    while t <= end:
        yield daemon(t, **{k: (v(t) if callable(v) else v) for k, v in kw.items()})
        t += 1.0


def test_commits_once_healthy_and_settled() -> None:
    verdict, at = run(gate(), every_second(T0 + 2, T0 + 100))
    assert isinstance(verdict, Commit), verdict
    assert at == T0 + 12  # healthy from T0+2, settled 10 s later


def test_a_restart_during_the_settle_time_starts_it_again() -> None:
    g = gate()
    for t in range(2, 8):
        assert isinstance(g.observe(daemon(T0 + t)), Wait)
    # a new process (a self-restart): healthy again, but it must settle from here
    verdict, at = run(g, every_second(T0 + 8, T0 + 100, pid=43, started=T0 + 7.5))
    assert isinstance(verdict, Commit) and at == T0 + 18


def test_crash_loop_rolls_back() -> None:
    exits = iter([0, 0, 1, 1, 2, 2, 3, 3])
    verdict, _at = run(gate(), (daemon(T0 + 1 + i, running=i % 2 == 0, exits=next(exits)) for i in range(8)))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRASHED"
    assert "3 times" in verdict.error.message


def test_a_version_that_never_starts_rolls_back_after_the_start_timeout() -> None:
    settings = replace(SETTINGS, window=30.0)
    verdict, at = run(gate(settings=settings), (Observation(T0 + t, False, 0) for t in range(0, 100)))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRASHED"
    assert "did not start" in verdict.error.message and at == T0 + 30


def test_critical_in_every_report_for_two_heartbeats_rolls_back() -> None:
    bad = frozenset({"HLT-BROKEN-BUILD"})
    verdict, at = run(gate(), every_second(T0 + 2, T0 + 60, health="critical", failing=bad))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRITICAL"
    assert "HLT-BROKEN-BUILD" in verdict.error.message
    assert at == T0 + 2 + SETTINGS.critical_grace


def test_one_critical_sample_does_not_roll_back() -> None:
    g = gate()
    g.observe(daemon(T0 + 2, health="critical", failing=frozenset({"HLT-RSS"})))
    verdict, _ = run(g, every_second(T0 + 3, T0 + 100))
    assert isinstance(verdict, Commit)


def test_what_failed_under_the_previous_version_or_is_the_machines_does_not_roll_back() -> None:
    before = replace(REACHABLE, failing=("HLT-RSS",))
    failing = frozenset({"HLT-RSS", "HLT-DISK", "HLT-SKEW"})
    verdict, _ = run(gate(before), every_second(T0 + 2, T0 + 100, health="critical", failing=failing))
    assert isinstance(verdict, Commit), verdict


def test_a_check_that_cannot_run_on_this_machine_under_either_version_does_not_hold_it_back() -> None:
    before = replace(REACHABLE, unknown=("HLT-THREADS",))
    verdict, _ = run(gate(before), every_second(T0 + 2, T0 + 100, health="unknown", unknown=frozenset({"HLT-THREADS"})))
    assert isinstance(verdict, Commit), verdict
    # ... but a new one that cannot run is not healthy: the window runs out
    verdict, _ = run(gate(), every_second(T0 + 2, T0 + 200, health="unknown", unknown=frozenset({"HLT-THREADS"})))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-NOT-HEALTHY"


def test_cannot_reach_the_server_while_the_watcher_can_rolls_back() -> None:
    verdict, at = run(gate(), every_second(T0 + 2, T0 + 100, last_heartbeat_ok=None, health="warning"))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-UNREACHABLE"
    assert at == T0 + 2 + SETTINGS.unreachable_grace  # from when both the new daemon ran and the watcher saw the server


def test_server_down_is_never_held_against_the_new_version() -> None:
    """The server goes down at the switch and stays down for three windows: no rollback, and once it is back the
    new version reaches it and the upgrade commits."""
    g = gate()
    down = every_second(T0 + 2, T0 + 200, last_heartbeat_ok=None, health="warning", server_reachable=False)
    verdict, _ = run(g, down)
    assert isinstance(verdict, Wait) and "unreachable" in verdict.why
    back = every_second(T0 + 201, T0 + 300)
    verdict, _at = run(g, back)
    assert isinstance(verdict, Commit), verdict


def test_a_previous_version_that_could_not_reach_the_server_gives_no_reachability_verdict() -> None:
    g = gate(Baseline(reachable=False, heartbeat_seconds=2.0))
    verdict, _at = run(g, every_second(T0 + 2, T0 + 200, last_heartbeat_ok=None, health="warning"))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-NOT-HEALTHY"  # only the window


def test_the_previous_versions_record_is_not_the_new_ones() -> None:
    """Right after the restart daemon.json still holds the previous version's last record, healthy and reachable:
    that must never commit the new one."""
    verdict, _ = run(gate(), every_second(T0 + 1, T0 + 200, version="0.1.0", started=T0 - 500))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-NOT-HEALTHY"
