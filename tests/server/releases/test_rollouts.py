"""server/releases/rollouts.py on a real database (SQLite and PostgreSQL): waves, the failure budget, halting, pins; a
machine's jobs and heartbeats are written as the server writes them when the machine reports."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from agent.shared.errors import BadArguments
from agent.shared.wire import MachineFacts
from server.database.connection import parse_database
from server.database.heartbeats import Beat
from server.database.rollout_rows import (
    COMPLETED,
    FAILED,
    HALTED,
    OFFERED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    WAITING,
    WITHDRAWN,
    Selection,
)
from server.database.storage import Storage
from server.errors import (
    MachineNotFound,
    RolloutDowngrade,
    RolloutNoBundle,
    RolloutNoMachines,
    RolloutNotRunning,
    RolloutRunning,
)
from server.releases.rollouts import Rollouts, parse_wave, pin_back_failed_pin, plan_waves, target_of, wave_size
from tests.server.database.test_storage import new_machine

PUBLISHED = {("0.1.1", "DEBIAN12"), ("0.1.2", "DEBIAN12"), ("0.1.0", "DEBIAN12")}
T0 = 1_000_000.0


def host(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


@pytest.fixture
def storage(database: str) -> Iterator[Storage]:
    s = Storage.open(parse_database(database), create=True)
    for n in range(1, 7):
        facts = MachineFacts(machine_id=f"{n:032x}")
        s.enrol_machine(new_machine(host(n), hostname=f"m{n}", facts=facts, heartbeat_interval=10.0), T0)
    heartbeat(s, *[host(n) for n in range(1, 7)], at=T0)
    yield s
    s.close()


def heartbeat(storage: Storage, *host_ids: str, at: float, version: str = "0.1.0", health: str = "healthy") -> None:
    report = json.dumps({"status": health, "time": at, "checks": []})
    storage.record_heartbeats(Beat(h, at, version, report) for h in host_ids)


def report(storage: Storage, host_id: str, state: str, at: float, error_id: str | None = None) -> None:
    """The machine reports on the upgrade job the server offered it (as POST /v1/jobs does)."""
    machine = storage.machine(host_id)
    assert machine is not None and machine.target_job is not None
    storage.report_job(
        principals=[f"host:{host_id}"],
        job_id=machine.target_job,
        host_id=host_id,
        hostname=machine.hostname,
        kind="upgrade",
        state=state,
        error_id=error_id,
        remediation=None,
        detail=state,
        now=at,
    )


def start(storage: Storage, wave: str = "33%", max_failures: int = 1, version: str = "0.1.1") -> str:
    rollout, _ = Rollouts(storage).start(
        version, Selection(all=True), parse_wave(wave), max_failures, 600.0, PUBLISHED, T0
    )
    return rollout.rollout_id


def states(storage: Storage, rollout_id: str) -> dict[str, str]:
    _, members = Rollouts(storage).show(rollout_id)
    return {m.host_id: m.state for m in members}


def offered(storage: Storage, rollout_id: str) -> list[str]:
    return [h for h, s in states(storage, rollout_id).items() if s == OFFERED]


def upgrade(storage: Storage, host_ids: list[str], at: float, version: str = "0.1.1") -> None:
    for h in host_ids:
        report(storage, h, "running", at)
        report(storage, h, "succeeded", at + 1)
    heartbeat(storage, *host_ids, at=at + 2, version=version)


def test_waves_are_shares_or_counts_of_the_selection() -> None:
    assert wave_size(parse_wave("10%"), 20) == 2
    assert wave_size(parse_wave("10%"), 3) == 1  # at least one machine
    assert wave_size(parse_wave("34%"), 6) == 3
    assert wave_size(parse_wave("4"), 20) == 4
    plan = plan_waves(["c", "a", "b"], 2)
    assert plan == [("a", 1), ("b", 1), ("c", 2)]
    for bad in ("0%", "101%", "0", "-1", "ten", "10 %"):
        with pytest.raises(BadArguments):
            parse_wave(bad)


def test_a_fleet_moves_wave_by_wave_and_only_once_verified(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    rollout_id = start(storage)  # 6 machines, 2 per wave: 3 waves
    first = offered(storage, rollout_id)
    assert len(first) == 2
    assert list(states(storage, rollout_id).values()).count(WAITING) == 4
    m = storage.machine(first[0])
    assert m is not None and target_of(m) is not None and target_of(m).version == "0.1.1"  # type: ignore[union-attr]
    # The jobs succeeded, but the heartbeats still say 0.1.0: not verified, no next wave.
    for h in first:
        report(storage, h, "succeeded", T0 + 10)
    rollouts.advance(T0 + 11)
    assert offered(storage, rollout_id) == first
    heartbeat(storage, *first, at=T0 + 12, version="0.1.1")
    rollouts.advance(T0 + 13)
    second = offered(storage, rollout_id)
    assert len(second) == 2 and not set(second) & set(first)
    upgrade(storage, second, T0 + 20)
    rollouts.advance(T0 + 23)
    third = offered(storage, rollout_id)
    upgrade(storage, third, T0 + 30)
    rollouts.advance(T0 + 33)
    rollout, members = rollouts.show(rollout_id)
    assert rollout.state == COMPLETED
    assert {m.state for m in members} == {SUCCEEDED}
    assert all(m.agent_version == "0.1.1" for m in members)


def test_critical_on_the_new_version_holds_the_wave(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    rollout_id = start(storage)
    first = offered(storage, rollout_id)
    upgrade(storage, first, T0 + 10)
    heartbeat(storage, first[0], at=T0 + 13, version="0.1.1", health="critical")
    rollouts.advance(T0 + 14)
    assert states(storage, rollout_id)[first[0]] == OFFERED
    assert len(offered(storage, rollout_id)) == 1  # the other one is verified; the wave waits for this one


def test_a_rollback_halts_the_rollout_and_pins_the_machine(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    rollout_id = start(storage, version="0.1.2")
    first = offered(storage, rollout_id)
    report(storage, first[0], "running", T0 + 5)  # the other one never started
    report(storage, first[0], "failed", T0 + 20, error_id="UPDATE-CRASHED")
    rollouts.advance(T0 + 21)
    rollout, members = rollouts.show(rollout_id)
    assert rollout.state == HALTED
    assert "UPDATE-CRASHED" in (rollout.reason or "") and first[0] in (rollout.reason or "")
    by_host = {m.host_id: m for m in members}
    assert by_host[first[0]].state == FAILED and by_host[first[0]].error_id == "UPDATE-CRASHED"
    assert by_host[first[1]].state == WITHDRAWN  # had not started: its target is withdrawn
    assert [m.state for m in members if m.wave > 1] == [WAITING] * 4  # later waves never offered
    failed = storage.machine(first[0])
    assert failed is not None and failed.pinned_version == "0.1.0" and target_of(failed).version == "0.1.0"  # type: ignore[union-attr]
    withdrawn = storage.machine(first[1])
    assert withdrawn is not None and target_of(withdrawn) is None
    job = storage.job(by_host[first[1]].job_id or "")
    assert job is not None and (job.state, job.error_id) == ("failed", "ROLLOUT-HALTED")
    # A halted rollout does not block the next one; the pinned machine is skipped by it.
    rollout_id2 = start(storage, version="0.1.1", wave="100%")
    assert states(storage, rollout_id2)[first[0]] == SKIPPED


def test_a_failure_budget_above_one_keeps_going(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    rollout_id = start(storage, max_failures=2)
    first = offered(storage, rollout_id)
    report(storage, first[0], "failed", T0 + 5, error_id="UPDATE-CRITICAL")
    upgrade(storage, [first[1]], T0 + 6)
    rollouts.advance(T0 + 9)
    assert Rollouts(storage).show(rollout_id)[0].state == RUNNING
    assert len(offered(storage, rollout_id)) == 2  # wave 2


def test_a_machine_that_does_not_finish_in_time_fails_with_update_timed_out(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    rollout_id = start(storage, max_failures=5)
    first = offered(storage, rollout_id)
    rollouts.advance(T0 + 601)
    _, members = rollouts.show(rollout_id)
    timed_out = [m for m in members if m.host_id in first]
    assert {(m.state, m.error_id) for m in timed_out} == {(FAILED, "UPDATE-TIMED-OUT")}
    job = storage.job(timed_out[0].job_id or "")
    assert job is not None and job.error_id == "UPDATE-TIMED-OUT"


def test_a_machine_out_of_time_is_pinned_to_the_version_it_runs_with_the_reason(storage: Storage) -> None:
    """A wave timeout is a failed move like a rollback: the machine is pinned (never left unpinned for the next
    rollout to offer it a version again), to the version its heartbeats say it runs, with the timeout as the reason,
    and is told no move; the failure counts against --max-failures as before."""
    rollouts = Rollouts(storage)
    rollout_id = start(storage, max_failures=2)
    stuck, switched = offered(storage, rollout_id)
    report(storage, switched, "running", T0 + 5)  # switched to 0.1.1 and never verified (e.g. it does not replicate)
    heartbeat(storage, switched, at=T0 + 6, version="0.1.1")
    heartbeat(storage, stuck, at=T0 + 6, version="0.1.0")  # never got there (its download kept failing)
    rollouts.advance(T0 + 601)
    rollout, members = rollouts.show(rollout_id)
    assert rollout.state == HALTED  # two failures, at most two: the budget counts them as it did
    assert {(m.state, m.error_id) for m in members if m.host_id in (stuck, switched)} == {(FAILED, "UPDATE-TIMED-OUT")}
    for host_id, runs in ((stuck, "0.1.0"), (switched, "0.1.1")):
        m = storage.machine(host_id)
        assert m is not None and m.pinned_version == runs
        assert m.pin_reason is not None and "UPDATE-TIMED-OUT" in m.pin_reason and "0.1.1" in m.pin_reason
        target = target_of(m)
        assert target is not None and (target.version, target.job_id, target.pinned) == (runs, None, True)
    # The next rollout leaves them alone until an operator has looked and unpinned them.
    rollout_id2 = start(storage, version="0.1.1", wave="100%")
    assert states(storage, rollout_id2)[stuck] == SKIPPED and states(storage, rollout_id2)[switched] == SKIPPED


def test_one_rollout_at_a_time_and_halt_by_hand(storage: Storage) -> None:
    start(storage)
    with pytest.raises(RolloutRunning):
        start(storage)
    rollout, _ = Rollouts(storage).halt("by hand", T0 + 1)
    assert rollout.state == HALTED
    with pytest.raises(RolloutNotRunning):
        Rollouts(storage).halt("again", T0 + 2)


def test_refused_rollouts_change_nothing(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    with pytest.raises(RolloutNoBundle, match=r"0\.9\.9"):
        rollouts.start("0.9.9", Selection(all=True), parse_wave("10%"), 1, 600, PUBLISHED, T0)
    with pytest.raises(RolloutNoMachines):
        rollouts.start("0.1.1", Selection(os_tag="RHEL9"), parse_wave("10%"), 1, 600, PUBLISHED, T0)
    with pytest.raises(MachineNotFound):
        rollouts.start("0.1.1", Selection(machines=(host(99),)), parse_wave("10%"), 1, 600, PUBLISHED, T0)
    assert rollouts.listing() == []
    assert all(m.target_version is None for m in storage.machines())


def test_pin_moves_a_machine_and_keeps_it_out_of_rollouts(storage: Storage) -> None:
    rollouts = Rollouts(storage)
    (m,) = rollouts.pin([host(1)], "0.1.2", "canary", PUBLISHED, T0)
    assert (m.pinned_version, m.target_version, m.pin_reason) == ("0.1.2", "0.1.2", "canary")
    target = target_of(m)
    assert target is not None and target.pinned and target.job_id is not None
    job = storage.job(target.job_id)
    assert job is not None and (job.kind, job.state, job.owner) == ("upgrade", "running", f"host:{host(1)}")
    (m,) = rollouts.pin([host(2)], None, "hold", PUBLISHED, T0)  # at the version it runs: no job
    assert (m.pinned_version, m.target_job) == ("0.1.0", None)
    rollout_id = start(storage, wave="100%")
    assert states(storage, rollout_id)[host(1)] == SKIPPED
    (m,) = rollouts.unpin([host(1)])
    assert (m.pinned_version, m.target_version) == (None, None)
    with pytest.raises(RolloutNoBundle):
        rollouts.pin([host(3)], "0.3.0", "x", PUBLISHED, T0)
    with pytest.raises(MachineNotFound):
        rollouts.unpin([host(77)])
    with pytest.raises(MachineNotFound):
        rollouts.pin([host(78)], None, "x", PUBLISHED, T0)


def test_a_downgrade_is_refused_unless_the_operator_allows_it(storage: Storage) -> None:
    """Versions move forward: a rollout to a version older than one a selected machine runs is refused (nothing
    started, nothing offered) unless --allow-downgrade; a pinned machine is not moved by a rollout, so it does not
    count; `pin --to` stays the explicit way back."""
    rollouts = Rollouts(storage)
    heartbeat(storage, host(2), host(5), at=T0 + 1, version="0.1.2")
    with pytest.raises(RolloutDowngrade) as refused:
        rollouts.start("0.1.1", Selection(all=True), parse_wave("100%"), 1, 600, PUBLISHED, T0 + 2)
    assert "m2" in refused.value.message and "m5" in refused.value.message and "0.1.2" in refused.value.message
    assert rollouts.listing() == [] and all(m.target_version is None for m in storage.machines())
    rollouts.pin([host(2), host(5)], None, "hold", PUBLISHED, T0 + 3)  # pinned at 0.1.2: out of rollouts
    rollout_id = start(storage, wave="100%")
    assert states(storage, rollout_id)[host(2)] == SKIPPED
    rollouts.halt("by hand", T0 + 4)
    rollouts.unpin([host(2), host(5)])
    rollout, members = rollouts.start(
        "0.1.1", Selection(all=True), parse_wave("100%"), 1, 600, PUBLISHED, T0 + 5, allow_downgrade=True
    )
    assert rollout.state == RUNNING and {m.host_id for m in members if m.state == OFFERED} >= {host(2), host(5)}


def fail_move(storage: Storage, host_id: str, at: float, runs: str | None, error_id: str = "UPDATE-CRASHED") -> None:
    """The machine reports that its move failed, as POST /v1/jobs does (the pin-back in the report's transaction)."""
    machine = storage.machine(host_id)
    assert machine is not None and machine.target_job is not None
    job_id = machine.target_job
    storage.report_job(
        principals=[f"host:{host_id}"],
        job_id=job_id,
        host_id=host_id,
        hostname=machine.hostname,
        kind="upgrade",
        state="failed",
        error_id=error_id,
        remediation=None,
        detail="rolled back",
        now=at,
        then=lambda tx: (pin_back_failed_pin(tx, host_id, job_id, runs, error_id), None)[1],
    )


def test_a_failed_pin_move_pins_the_machine_to_the_version_it_runs(storage: Storage) -> None:
    """`pin --to 0.1.2` (a canary) whose upgrade is rolled back: the server no longer keeps the machine pinned to
    the failed version, but to the one it runs, with the failure as the reason, as for a rollout's member."""
    rollouts = Rollouts(storage)
    rollouts.pin([host(1)], "0.1.2", "canary", PUBLISHED, T0)
    heartbeat(storage, host(1), at=T0 + 5, version="0.1.2")  # the new version heartbeated before it was rolled back
    fail_move(storage, host(1), T0 + 10, runs="0.1.0")
    m = storage.machine(host(1))
    assert m is not None and (m.pinned_version, m.target_version, m.target_job) == ("0.1.0", "0.1.0", None)
    assert m.pin_reason is not None and "0.1.2" in m.pin_reason and "UPDATE-CRASHED" in m.pin_reason
    target = target_of(m)
    assert target is not None and (target.version, target.job_id, target.pinned) == ("0.1.0", None, True)

    # An agent that does not say what it runs: its heartbeats do, unless they came from the failed version.
    rollouts.pin([host(2)], "0.1.2", "canary", PUBLISHED, T0)
    fail_move(storage, host(2), T0 + 10, runs=None, error_id="UPDATE-STATE-FORMAT")
    m = storage.machine(host(2))
    assert m is not None and (m.pinned_version, m.target_job) == ("0.1.0", None)
    rollouts.pin([host(3)], "0.1.2", "canary", PUBLISHED, T0)
    heartbeat(storage, host(3), at=T0 + 5, version="0.1.2")
    fail_move(storage, host(3), T0 + 10, runs=None)
    m = storage.machine(host(3))
    assert m is not None and (m.pinned_version, m.target_job) == ("0.1.2", None)
    assert m.pin_reason is not None and "not known yet" in m.pin_reason

    # A rollout member's failure is the rollout's to settle (its pass pins it to the version it ran).
    rollout_id = start(storage, wave="100%")
    (member, *_) = offered(storage, rollout_id)
    fail_move(storage, member, T0 + 20, runs="0.1.0")
    m = storage.machine(member)
    assert m is not None and m.pinned_version is None
    rollouts.advance(T0 + 21)
    m = storage.machine(member)
    assert m is not None and m.pinned_version == "0.1.0" and "failed" in (m.pin_reason or "")


def test_the_dashboard_reads_a_rollout_a_page_at_a_time_and_counts_it_in_the_database(storage: Storage) -> None:
    first = start(storage, wave="2")
    Rollouts(storage).halt("enough", T0 + 1)
    second = start(storage, wave="1")
    rollouts = Rollouts(storage)
    assert [r.rollout_id for r in rollouts.newest(10)] == [second, first]
    assert [r.rollout_id for r in rollouts.newest(1)] == [second]
    counts = rollouts.counts([first, second])
    assert counts[second] == {OFFERED: 1, WAITING: 5}
    assert sum(counts[first].values()) == 6 and counts[first].get(WITHDRAWN) == 2
    found, total, members, by_state = rollouts.page(second, offset=1, limit=2)
    assert found is not None and found.rollout_id == second and total == 6 and by_state == counts[second]
    assert [m.wave for m in members] == [2, 3]  # wave order, a page of it
    _, total, members, _ = rollouts.page(second, states=(OFFERED,))
    assert total == 1 and [m.state for m in members] == [OFFERED]
    assert rollouts.page(str(uuid.uuid4())) == (None, 0, [], {})
    assert rollouts.counts([]) == {}
