"""The JSON documents the dashboard's pages render and refresh: what each page shows, from the fleet snapshot and
the few lookups a page makes by key (a machine, its jobs and points, a page of a rollout). Blocking: the site calls
these in a worker thread. Every list is bounded: a page of the fleet, the newest N of anything else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from server.database.jobs import Job
from server.database.rollout_rows import Rollout
from server.database.storage import Storage
from server.process.store import Point
from server.releases.rollouts import Rollouts
from server.ui.history import FLEET_COLUMNS, History
from server.ui.snapshot import DiskQuery, MachineQuery, Snapshot, disks_page, machines_page

RECENT_ERRORS = 20
MACHINE_JOBS = 50
MACHINE_POINTS = 50
TEST_FAILOVERS = 20
ROLLOUTS = 20
TEST_FAILOVER_KIND = "test-failover"  # the job kind `mobility-server test-failover` records its result as
_ERROR_STATES = ("failed", "succeeded with warnings")


def _job(j: Job) -> dict[str, Any]:
    return asdict(j) | {"owner": None}  # who may report on it is not the dashboard's business


def _rollout(r: Rollout, counts: dict[str, int]) -> dict[str, Any]:
    return r.to_json() | {"selection": r.selection.describe(), "counts": counts}


def overview(snap: Snapshot, history: History, storage: Storage, instance: dict[str, Any]) -> dict[str, Any]:
    failed = storage.recent_jobs(states=_ERROR_STATES, limit=RECENT_ERRORS)
    disk_errors = [d.to_json() for d in snap.disk_errors[:RECENT_ERRORS]]
    return {
        "taken_at": snap.taken_at,
        "build_seconds": snap.build_seconds,
        "machines": len(snap.machines),
        "disks": len(snap.disks),
        "breaches": snap.breaches,
        "counts": snap.counts,
        "store": snap.store.to_json() if snap.store else None,
        "rollouts": [_rollout(r, c) for r, c in snap.rollouts if r.state == "running"],
        "newest_rollout": _rollout(*snap.rollouts[0]) if snap.rollouts else None,
        "errors": [_job(j) for j in failed],
        "disk_errors": disk_errors,
        "instance": instance,
        "series": {"columns": ["time", *FLEET_COLUMNS], "data": history.fleet_columns()},
    }


def machines(snap: Snapshot, query: MachineQuery) -> dict[str, Any]:
    total, rows = machines_page(snap, query)
    return {
        "taken_at": snap.taken_at,
        "total": total,
        "fleet": len(snap.machines),
        "offset": query.offset,
        "limit": query.limit,
        "sort": query.sort,
        "order": "desc" if query.descending else "asc",
        "machines": [m.to_json() for m in rows],
        "os_tags": sorted(snap.counts.get("os_tag", {})),
        "versions": sorted(snap.counts.get("version", {})),
    }


def _point(p: Point) -> dict[str, Any]:
    return {
        "point_id": p.point_id,
        "created": p.created,
        "consistency": p.consistency,
        "freeze_ms": p.freeze_ms,
        "complete": p.complete,
        "disks": [{"disk": d.disk, "size": d.size, "root": d.root} for d in p.disks],
    }


def machine(
    snap: Snapshot,
    history: History,
    storage: Storage,
    points_of: Callable[[str, int], list[Point]],
    host_id: str,
) -> dict[str, Any] | None:
    """A machine's page; None when there is no such machine."""
    m = storage.machine(host_id)
    if m is None:
        return None
    view = snap.by_id.get(host_id)
    protection = storage.protection(host_id)
    jobs = storage.jobs_for(host_id, MACHINE_JOBS)
    points = points_of(host_id, MACHINE_POINTS)
    disks = []
    for d in view.disks if view else ():
        doc = d.to_json()
        doc["series"] = history.disk(host_id, d.disk)
        disks.append(doc)
    return {
        "taken_at": snap.taken_at,
        "machine": {
            "host_id": m.host_id,
            "hostname": m.hostname,
            "os_tag": m.os_tag,
            "role": m.role,
            "platform": m.platform,
            "agent_version": m.agent_version,
            "enrolled_at": m.enrolled_at,
            "last_seen": m.last_seen,
            "heartbeat_interval": m.heartbeat_interval,
            "certificate_expires": m.cert_not_after,
            "revoked_at": m.revoked_at,
            "cloned_from": m.cloned_from,
            "target_version": m.target_version,
            "pinned": m.pinned_version,
            "pin_reason": m.pin_reason,
            "health": m.health.to_json() if m.health else None,
        },
        "view": view.to_json() if view else None,
        "protection": None
        if protection is None
        else {
            "disks": list(protection.disks),
            "all_disks": protection.all_disks,
            "paused": protection.paused,
            "policy": protection.policy.to_json(),
        },
        "disks": disks,
        "charted": len(history.disks),
        "points": [_point(p) for p in points],
        "jobs": [_job(j) for j in jobs],
    }


def protection(snap: Snapshot, storage: Storage, query: DiskQuery, running: dict[str, Any] | None) -> dict[str, Any]:
    total, rows = disks_page(snap, query)
    return {
        "taken_at": snap.taken_at,
        "total": total,
        "all_disks": len(snap.disks),
        "breaches": snap.breaches,
        "offset": query.offset,
        "limit": query.limit,
        "disks": [d.to_json() for d in rows],
        "test_failovers": [_job(j) for j in storage.recent_jobs(kind=TEST_FAILOVER_KIND, limit=TEST_FAILOVERS)],
        "running": running,
    }


def rollouts(snap: Snapshot) -> dict[str, Any]:
    """The newest rollouts, as of the snapshot (their counts made there)."""
    return {"taken_at": snap.taken_at, "rollouts": [_rollout(r, c) for r, c in snap.rollouts]}


def rollout(
    storage: Storage, rollout_id: str, states: tuple[str, ...], offset: int, limit: int
) -> dict[str, Any] | None:
    found, total, members, counts = Rollouts(storage).page(rollout_id, states=states, offset=offset, limit=limit)
    if found is None:
        return None
    return {
        "rollout": _rollout(found, counts),
        "total": total,
        "offset": offset,
        "limit": limit,
        "members": [m.to_json() for m in members],
    }
