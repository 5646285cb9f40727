"""The health gate, fed the observations a watcher makes: when it commits, when it rolls back, and the false rollbacks
it must never make (the server down, one bad sample, a condition the previous version had too, the environment: the
clock, the process server, a supervisor that does not answer)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from agent.daemon.config import AgentConfig
from agent.daemon.health.self_checks import CHECK_TYPES, DiskSample, ProcessSample, ServerSample, health_checks
from agent.lifecycle.freeze import FreezeSetup
from agent.update.gate import ENVIRONMENT, Commit, GateSettings, HealthGate, Observation, RollBack, Verdict, Wait
from agent.update.state import Baseline

SETTINGS = GateSettings(window=60.0, settle=10.0, heartbeat=2.0)
T0 = 1_000.0
NEW = "0.1.1"
REACHABLE = Baseline(reachable=True, heartbeat_seconds=2.0)


def gate(baseline: Baseline = REACHABLE, settings: GateSettings = SETTINGS) -> HealthGate:
    return HealthGate(settings, baseline, NEW, restarted_at=T0)


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


def run(g: HealthGate, observations: Iterator[Observation]) -> tuple[Verdict, float]:
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
    failing = frozenset({"HLT-RSS", "HLT-DISK", "HLT-CLOCK-SKEW"})
    verdict, _ = run(gate(before), every_second(T0 + 2, T0 + 100, health="critical", failing=failing))
    assert isinstance(verdict, Commit), verdict


def test_a_check_that_cannot_run_on_this_machine_under_either_version_does_not_hold_it_back() -> None:
    before = replace(REACHABLE, unknown=("HLT-THREADS-FILES",))
    verdict, _ = run(
        gate(before), every_second(T0 + 2, T0 + 100, health="unknown", unknown=frozenset({"HLT-THREADS-FILES"}))
    )
    assert isinstance(verdict, Commit), verdict
    # ... but a new one that cannot run is not healthy: the window runs out
    verdict, _ = run(gate(), every_second(T0 + 2, T0 + 200, health="unknown", unknown=frozenset({"HLT-THREADS-FILES"})))
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


# The environment is not the agent ---------------------------------------------------------------------------------


def reported_ids() -> set[str]:
    """Every check ID the daemon reports: what its health checks say when they run."""
    process = ProcessSample(30 << 20, 1.0, 8, 20, 8 << 30)
    checks = health_checks(
        AgentConfig(), T0, process, ServerSample(last_ok=T0, skew_seconds=0.0), DiskSample(1 << 40, 1 << 20),
        T0 + 86400 * 300, FreezeSetup(True, "hooks ready"), {"disks": []},
    )  # fmt: skip
    return {check.run().id for check in checks}


def test_the_gate_knows_every_check_the_daemon_reports_and_no_other() -> None:
    assert reported_ids() == {check.id for check in CHECK_TYPES}
    # What the checks themselves declare the environment's: the machine and its surroundings, not the agent's build.
    assert {"HLT-SERVER", "HLT-CLOCK-SKEW", "HLT-CERT", "HLT-DISK", "HLT-FREEZE", "HLT-REPLICATION"} == ENVIRONMENT


@pytest.mark.parametrize("check", sorted(reported_ids()))
def test_a_check_that_fails_in_the_window_rolls_back_only_if_it_is_the_agents(check: str) -> None:
    """Each ID the daemon can report, failing in every report after the switch (it passed before): the agent's own
    checks roll the version back as UPDATE-CRITICAL; the environment's never do (a clock step, a server or process
    server outage, a full disk, a certificate near its end, a freeze provider not set up)."""
    (kind,) = [c for c in CHECK_TYPES if c.id == check]
    verdict, _ = run(gate(), every_second(T0 + 2, T0 + 100, health="critical", failing=frozenset({check})))
    if kind.environment:
        assert isinstance(verdict, Commit), verdict
    else:
        assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRITICAL", verdict
        assert check in verdict.error.message


def test_a_check_this_program_does_not_know_is_judged_by_what_the_new_versions_report_declares() -> None:
    """A newer version's own new check: its report says whether a failure can be the environment's."""
    new_check = frozenset({"HLT-NEW-THING"})
    verdict, _ = run(
        gate(), every_second(T0 + 2, T0 + 100, health="critical", failing=new_check, environmental=new_check)
    )
    assert isinstance(verdict, Commit), verdict
    verdict, _ = run(gate(), every_second(T0 + 2, T0 + 100, health="critical", failing=new_check))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRITICAL"
    # ... but a check this program knows is judged by its own declaration, whatever a report says
    rss = frozenset({"HLT-RSS"})
    verdict, _ = run(gate(), every_second(T0 + 2, T0 + 100, health="critical", failing=rss, environmental=rss))
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-CRITICAL"


@pytest.mark.parametrize("step", [300.0, -300.0])
def test_a_clock_step_in_the_window_neither_rolls_back_nor_hides_the_new_version(step: float) -> None:
    """The machine's clock steps by five minutes 3 s after the restart (an NTP correction, a resumed VM): the
    daemon's records jump (its start, if it starts after the step, and its heartbeats), the watcher's monotonic
    clock does not. No window is used up by the step, the new version is still recognised (backwards, its start
    is 'before' the restart by the wall clock; the supervisor sees that very process), and it commits."""
    settings = replace(SETTINGS, window=20.0, settle=10.0)

    def looks() -> Iterator[Observation]:
        for t in range(2, 40):
            wall = T0 + t + (step if t >= 3 else 0.0)
            started = T0 + 1 + (step if t >= 3 else 0.0)  # it started after the step (a restart of its own)
            health = "critical" if t >= 3 else "healthy"  # the skew fails: the environment's
            skew = frozenset({"HLT-CLOCK-SKEW"}) if t >= 3 else frozenset()
            yield daemon(T0 + t, started=started, pid=42, supervised_pid=42, heartbeats=t, last_heartbeat_ok=wall - 0.5,
                         report_time=wall - 0.5, health=health, failing=skew)  # fmt: skip

    verdict, at = run(gate(settings=settings), looks())
    assert isinstance(verdict, Commit), verdict
    assert at == T0 + 13  # healthy from T0+3 (the new start), settled 10 s later: the step counted for nothing


def test_a_supervisor_that_does_not_answer_is_asked_again_and_concludes_nothing() -> None:
    """systemd too busy to answer `systemctl show` in time: neither a crash nor a window running out."""
    g = gate(settings=replace(SETTINGS, window=10.0))
    for t in range(2, 200):
        verdict = g.observe(Observation(T0 + t, None, 0, server_reachable=True))
        assert isinstance(verdict, Wait) and "looking again" in verdict.why, verdict
    verdict, _ = run(g, every_second(T0 + 200, T0 + 300))
    assert isinstance(verdict, Commit), verdict


# Replication, judged by progress ----------------------------------------------------------------------------------

REPLICATING = replace(REACHABLE, replicating=True)


def test_a_process_server_outage_in_the_window_never_rolls_back() -> None:
    """The previous version's disks were in CONTINUOUS; the new one's stall (the process server is down, or its
    store full) for ten windows: HLT-REPLICATION fails, the version waits, the window does not count. Once its
    disks are back in CONTINUOUS it commits."""
    g = gate(REPLICATING)
    stalled = frozenset({"HLT-REPLICATION"})
    verdict, _ = run(g, every_second(T0 + 2, T0 + 600, health="critical", failing=stalled, replicating=False))
    assert isinstance(verdict, Wait) and "CONTINUOUS" in verdict.why, verdict
    verdict, at = run(g, every_second(T0 + 601, T0 + 700, replicating=True))
    assert isinstance(verdict, Commit) and at == T0 + 601 + SETTINGS.replication_proof


def test_the_new_version_must_make_progress_where_the_previous_one_did_before_it_is_kept() -> None:
    """Healthy in every other way, but its disks not yet back in CONTINUOUS: not committed (it would be at once
    without a previous version that replicated)."""
    verdict, _ = run(gate(REPLICATING), every_second(T0 + 2, T0 + 30, replicating=False))
    assert isinstance(verdict, Wait)
    verdict, _ = run(gate(REACHABLE), every_second(T0 + 2, T0 + 30, replicating=False))
    assert isinstance(verdict, Commit)
    # CONTINUOUS at once is the state a clean stop left: progress only once it held, without an error, long enough
    # for a connection to the process server to have failed if it was going to.
    g = gate(REPLICATING)
    verdict, _ = run(g, every_second(T0 + 2, T0 + 15, replicating=True))
    assert isinstance(verdict, Wait)
    verdict, _ = run(g, every_second(T0 + 16, T0 + 40, replicating=False))
    assert isinstance(verdict, Wait)
    # Once it made progress, a later stall (the process server going down) is not held against it either.
    g = gate(REPLICATING)
    run(g, every_second(T0 + 2, T0 + 2 + SETTINGS.replication_proof, replicating=True))
    verdict, at = run(g, every_second(T0 + 18, T0 + 100, replicating=False))
    assert isinstance(verdict, Commit) and at == T0 + 18


def test_replication_waits_only_for_a_version_that_is_otherwise_healthy() -> None:
    """A version that does not report healthy still runs out of its window, replication or not."""
    settings = replace(SETTINGS, window=30.0)
    verdict, _ = run(
        gate(REPLICATING, settings),
        every_second(T0 + 2, T0 + 200, health="unknown", unknown=frozenset({"HLT-THREADS-FILES"}), replicating=False),
    )
    assert isinstance(verdict, RollBack) and verdict.error.code == "UPDATE-NOT-HEALTHY"
