"""server/ui/snapshot.py and history.py, pure: what the dashboard makes of the rows it read (machine states, a disk
against its RPO target, breaches first), the fleet's filters, orders and pages, the chart samples and their bounds."""

from __future__ import annotations

import json
import math

import pytest

from agent.shared.replication_wire import DiskReport, Policy, ReplicationReport
from server.database.fleet import FleetRow
from server.database.rollout_rows import Rollout, Selection
from server.errors import BadRequest
from server.ui import history as history_module
from server.ui.history import History, Ring, quantile
from server.ui.snapshot import Builder, DiskQuery, MachineQuery, disks_page, machines_page

NOW = 1_800_000_000.0
RPO = Policy("gold", rpo_seconds=600.0, interval_seconds=120.0)


def report(*disks: tuple[str, str, float | None], last_point: float | None = None) -> str:
    return json.dumps(
        ReplicationReport(
            tuple(DiskReport(d, state, 1 << 30, 0, lag, 1e6, None, last_point) for d, state, lag in disks)
        ).to_json()
    )


def row(i: int, **changes: object) -> FleetRow:
    fields: dict[str, object] = {
        "host_id": f"{i:08d}-0000-4000-8000-000000000000",
        "hostname": f"host-{i:03d}",
        "os_tag": "DEBIAN12" if i % 2 else "UBUNTU-22.04",
        "agent_version": "0.1.0" if i % 3 else "0.10.0",
        "last_seen": NOW - 5,
        "heartbeat_interval": 30.0,
        "revoked_at": None,
        "pinned_version": None,
        "cloned_from": None,
        "health": "healthy",
        "policy": None,
    }
    fields.update(changes)
    return FleetRow(**fields)  # type: ignore[arg-type]


def test_machine_states_health_and_protection() -> None:
    rows = [
        row(1),
        row(2, last_seen=NOW - 91),  # 3 intervals and a second: offline
        row(3, last_seen=None, health=None),
        row(4, revoked_at=NOW - 100),
        row(5, policy=RPO, reported_at=NOW - 5, report_json=report(("/dev/sdb", "CONTINUOUS", 3.0))),
        row(6, policy=RPO, paused=True),
        row(7, policy=RPO),
        row(
            8,
            policy=RPO,
            reported_at=NOW,
            report_json=report(("/dev/sdb", "CONTINUOUS", 1.0), ("/dev/sdc", "STALLED", 9.0)),
        ),
    ]
    snap = Builder().build(rows, NOW)
    by = {m.hostname: m for m in snap.machines}
    assert [by[f"host-00{i}"].state for i in (1, 2, 3, 4)] == ["online", "offline", "never seen", "revoked"]
    assert by["host-003"].health == "unknown"
    assert [by[f"host-00{i}"].protection for i in (1, 5, 6, 7, 8)] == [
        "unprotected",
        "CONTINUOUS",
        "PAUSED",
        "waiting",
        "STALLED",  # a machine is as bad as its worst disk
    ]
    assert by["host-008"].lag == 9.0 and by["host-008"].rpo == 600.0 and not by["host-008"].breach
    assert snap.counts["state"] == {"online": 5, "offline": 1, "never seen": 1, "revoked": 1}
    assert snap.counts["protection"]["unprotected"] == 4


def test_a_disk_breaches_its_rpo_when_its_lag_or_its_silence_exceeds_the_target() -> None:
    rows = [
        row(1, policy=RPO, reported_at=NOW, report_json=report(("/dev/sdb", "CONTINUOUS", 599.0))),
        row(2, policy=RPO, reported_at=NOW, report_json=report(("/dev/sdb", "RESYNCING", 601.0))),
        # Offline: the last report said 10 s, but that was 700 s ago; what is not known counts against the target.
        row(
            3,
            policy=RPO,
            last_seen=NOW - 700,
            reported_at=NOW - 700,
            report_json=report(("/dev/sdb", "CONTINUOUS", 10.0)),
        ),
        # A report stored before the wire bounded its figures: shown as nothing, never a crash or a breach.
        row(4, policy=RPO, reported_at=NOW, report_json='{"disks": [{"disk": "/dev/sdb", "lag_seconds": "x"}]}'),
        row(5, policy=RPO, reported_at=NOW, report_json="not json"),
    ]
    snap = Builder().build(rows, NOW)
    assert [(d.hostname, d.breach) for d in snap.disks] == [("host-003", True), ("host-002", True), ("host-001", False)]
    stale = snap.disks[0]
    assert stale.stale and stale.lag == 10.0 and stale.lag_now == 710.0
    assert snap.breaches == 2 and snap.by_id[rows[3].host_id].protection == "waiting"
    assert disks_page(snap, DiskQuery.parse({"breach": "1"}))[0] == 2


def test_a_report_is_parsed_again_only_when_it_changed() -> None:
    builder = Builder()
    seen: list[str] = []
    original = builder.report

    def counting(r: FleetRow) -> ReplicationReport | None:
        cached = builder._reports.get(r.host_id)
        if cached is None or cached[0] != r.reported_at:
            seen.append(r.host_id)
        return original(r)

    builder.report = counting  # type: ignore[method-assign]
    a = row(1, policy=RPO, reported_at=NOW, report_json=report(("/dev/sdb", "CONTINUOUS", 1.0)))
    b = row(2, policy=RPO, reported_at=NOW, report_json=report(("/dev/sdb", "CONTINUOUS", 2.0)))
    builder.build([a, b], NOW)
    b2 = b._replace(reported_at=NOW + 1, report_json=report(("/dev/sdb", "CONTINUOUS", 50.0)))
    snap = builder.build([a, b2], NOW + 1)
    assert seen == [a.host_id, b.host_id, b.host_id]
    assert snap.by_id[b.host_id].lag == 50.0
    builder.build([a], NOW + 2)
    assert set(builder._reports) == {a.host_id}  # a machine gone is forgotten


def test_filters_orders_and_pages_of_the_fleet() -> None:
    rows = [row(i) for i in range(1, 31)]
    rows[4] = rows[4]._replace(health="critical")
    rows[9] = rows[9]._replace(last_seen=NOW - 1000)
    snap = Builder().build(rows, NOW)
    total, page = machines_page(snap, MachineQuery.parse({"limit": "10", "offset": "10"}))
    assert total == 30 and [m.hostname for m in page] == [f"host-{i:03d}" for i in range(11, 21)]
    _, page = machines_page(snap, MachineQuery.parse({"sort": "hostname", "order": "desc", "limit": "2"}))
    assert [m.hostname for m in page] == ["host-030", "host-029"]
    _, page = machines_page(snap, MachineQuery.parse({"sort": "health", "limit": "1"}))
    assert page[0].hostname == "host-005"  # critical first
    assert machines_page(snap, MachineQuery.parse({"state": "offline"}))[0] == 1
    assert machines_page(snap, MachineQuery.parse({"q": "HOST-02"}))[0] == 10
    assert machines_page(snap, MachineQuery.parse({"os_tag": "DEBIAN12"}))[0] == 15
    # Versions sort as numbers: 0.10.0 after 0.1.0.
    _, page = machines_page(snap, MachineQuery.parse({"sort": "version", "order": "desc", "limit": "1"}))
    assert page[0].version == "0.10.0"
    assert snap.ordered("version", True) is snap.ordered("version", True)  # made once per snapshot


@pytest.mark.parametrize(
    "params",
    [{"sort": "evil"}, {"order": "up"}, {"limit": "501"}, {"limit": "0"}, {"offset": "-1"}, {"offset": "9" * 20},
     {"state": "gone"}, {"q": "x" * 101}, {"os_tag": "x" * 65}, {"protection": "BROKEN"}],
)  # fmt: skip
def test_a_query_past_its_bounds_is_bad_request(params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        MachineQuery.parse(params)


def test_the_snapshot_carries_the_newest_points_store_and_rollouts() -> None:
    rollout = Rollout("r1", "0.2.0", Selection(all=True), 5, 2, 1, 1, 60.0, "running", None, NOW, NOW)
    rows = [row(1, policy=RPO)]
    snap = Builder().build(rows, NOW, newest_points={rows[0].host_id: NOW - 30}, rollouts=[(rollout, {"offered": 5})])
    assert snap.machines[0].newest_point == NOW - 30 and snap.rollouts[0][1] == {"offered": 5}


def test_rings_keep_the_newest_samples_in_order() -> None:
    ring = Ring(3, 2)
    for t in range(5):
        ring.append(float(t), (t * 10.0, None if t == 3 else math.inf if t == 4 else 1.0))
    assert ring.columns() == [[2.0, 3.0, 4.0], [20.0, 30.0, 40.0], [1.0, None, None]]


def test_heartbeat_quantiles_interpolate_inside_their_bucket() -> None:
    bounds = (0.01, 0.1, 1.0)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.005)
    assert quantile(bounds, [0, 100, 0, 0], 0.99) == pytest.approx(0.01 + 0.09 * 0.99)
    assert quantile(bounds, [0, 0, 0, 5], 0.5) == 1.0  # past the last bound: the last bound


def test_history_samples_a_disk_per_report_and_bounds_the_disks_it_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_DISKS", 2)
    builder = Builder()
    h = History((0.01, 0.1))

    def snap_at(t: float, reported: float) -> object:
        rows = [row(i, policy=RPO, reported_at=reported, report_json=report(("/dev/sdb", "CONTINUOUS", float(i))))
                for i in (1, 2, 3)]  # fmt: skip
        return builder.build(rows, t)

    h.sample(snap_at(NOW, NOW), [0.0, 0.0, 0.0], NOW)  # type: ignore[arg-type]
    h.sample(snap_at(NOW + 10, NOW), [2.0, 4.0, 4.0], NOW + 10)  # the same reports: no new disk sample
    h.sample(snap_at(NOW + 20, NOW + 15), [2.0, 4.0, 4.0], NOW + 20)
    # The disks nearest their target are charted first: host-003 and host-002, not host-001.
    assert h.untracked == 1 and len(h.disks) == 2 and h.disk(row(1).host_id, "/dev/sdb") is None
    lag = h.disk(row(3).host_id, "/dev/sdb")
    assert lag is not None and lag[0] == [NOW, NOW + 15] and lag[1] == [3.0, 3.0]
    fleet = h.fleet_columns()
    assert fleet[0] == [NOW, NOW + 10, NOW + 20]
    assert fleet[1][1] == pytest.approx(0.4)  # 4 heartbeats in 10 s
    assert fleet[2][1] is not None and 0 < fleet[2][1] <= 10  # p50, ms
