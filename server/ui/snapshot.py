"""The fleet as the dashboard and /metrics see it: one snapshot made from one read of the database
(``Storage.fleet``), the chunk store's newest points and footprint, and the newest rollouts' counts.

A periodic job (server/ui/site.py) rebuilds it every ``--ui-refresh`` seconds in a worker thread; requests only read
the newest one. The pages that list the whole fleet filter, sort and page it in memory (a few milliseconds at 10,000
machines; each sort order is kept with the snapshot it was made from); everything else is a lookup. Nothing here
does I/O: the builder takes what was read and the time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.shared.replication_wire import STATES, ReplicationReport
from agent.shared.wire import HEALTH_STATES
from server.database.fleet import FleetRow
from server.database.protection import stored_report
from server.database.rollout_rows import Rollout
from server.errors import BadRequest

ONLINE, OFFLINE, REVOKED, NEVER_SEEN = "online", "offline", "revoked", "never seen"
MACHINE_STATES = (ONLINE, OFFLINE, REVOKED, NEVER_SEEN)
UNPROTECTED, WAITING = "unprotected", "waiting"  # not protected; protected, no report of its disks yet
PROTECTION_STATES = (UNPROTECTED, WAITING, *STATES)
# The worse of two disks' states is the machine's (a machine whose one disk stalls is stalled).
_SEVERITY = {"CONTINUOUS": 0, "PAUSED": 1, "INITIAL_SYNC": 2, "RESYNCING": 3, "RESYNC_REQUIRED": 4, "STALLED": 5}
_HEALTH_ORDER = {"critical": 0, "warning": 1, "unknown": 2, "healthy": 3}
MAX_PAGE = 500


class DiskView(NamedTuple):
    """A protected disk against its machine's RPO target (tuples: a snapshot makes one per disk of the fleet)."""

    host_id: str
    hostname: str
    disk: str
    state: str
    size: int
    bytes_left: int
    lag: float | None  # as the machine last reported it
    lag_now: float | None  # the same, plus the report's age once the machine stopped reporting (a lower bound)
    throughput: float
    eta: float | None
    last_point: float | None
    error: str | None
    detail: str | None
    rpo: float
    reported_at: float | None
    stale: bool  # the machine stopped reporting (offline): the figures are as of ``reported_at``
    breach: bool

    @property
    def ratio(self) -> float:
        """Lag against the RPO target (1.0: at the target)."""
        return (self.lag_now or 0.0) / self.rpo if self.rpo > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "hostname": self.hostname,
            "disk": self.disk,
            "state": self.state,
            "size": self.size,
            "bytes_left": self.bytes_left,
            "lag_seconds": self.lag,
            "lag_now_seconds": self.lag_now,
            "throughput_bps": self.throughput,
            "eta_seconds": self.eta,
            "last_point": self.last_point,
            "error": self.error,
            "detail": self.detail,
            "rpo_seconds": self.rpo,
            "reported_at": self.reported_at,
            "stale": self.stale,
            "breach": self.breach,
        }


class MachineView(NamedTuple):
    host_id: str
    hostname: str
    os_tag: str
    version: str
    last_seen: float | None
    state: str
    health: str
    protection: str  # UNPROTECTED, WAITING, PAUSED or its worst disk's state
    policy: str | None
    rpo: float | None
    interval: float | None
    lag: float | None  # the largest ``lag_now`` of its disks
    breach: bool
    newest_point: float | None
    pinned: str | None
    cloned_from: str | None
    disks: tuple[DiskView, ...]

    @property
    def ratio(self) -> float:
        return (self.lag or 0.0) / self.rpo if self.rpo else 0.0

    def to_json(self, *, with_disks: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "host_id": self.host_id,
            "hostname": self.hostname,
            "os_tag": self.os_tag,
            "agent_version": self.version,
            "last_seen": self.last_seen,
            "state": self.state,
            "health": self.health,
            "protection": self.protection,
            "policy": self.policy,
            "rpo_seconds": self.rpo,
            "interval_seconds": self.interval,
            "lag_seconds": self.lag,
            "breach": self.breach,
            "newest_point": self.newest_point,
            "pinned": self.pinned,
            "cloned_from": self.cloned_from,
        }
        if with_disks:
            doc["disks"] = [d.to_json() for d in self.disks]
        return doc


@dataclass(frozen=True)
class StoreFigures:
    """The chunk store as its files show it (None in a snapshot when this instance holds no store)."""

    bytes: int
    free: int
    size: int
    reserve: int

    def to_json(self) -> dict[str, Any]:
        return {"store_bytes": self.bytes, "free_bytes": self.free, "filesystem_bytes": self.size,
                "reserve_bytes": self.reserve}  # fmt: skip


@dataclass
class Snapshot:
    taken_at: float
    build_seconds: float
    machines: tuple[MachineView, ...]
    disks: tuple[DiskView, ...]  # RPO breaches first, then by lag against the target
    store: StoreFigures | None
    rollouts: list[tuple[Rollout, dict[str, int]]]
    by_id: dict[str, MachineView] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    generation: int = 0
    _orders: dict[tuple[str, bool], tuple[MachineView, ...]] = field(default_factory=dict)
    exposition: dict[str, bytes] = field(default_factory=dict)  # the fleet's /metrics text, made once if asked for
    disk_errors: tuple[DiskView, ...] = ()  # the disks that report an error, in ``disks`` order

    @property
    def breaches(self) -> int:
        return sum(1 for d in self.disks if d.breach)

    def ordered(self, sort: str, descending: bool) -> tuple[MachineView, ...]:
        """The machines in one order, made once per snapshot."""
        key = (sort, descending)
        found = self._orders.get(key)
        if found is None:
            found = tuple(sorted(self.machines, key=SORT_KEYS[sort], reverse=descending))
            self._orders[key] = found
        return found


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value >= 0 else None


class Builder:
    """Makes snapshots; keeps the replication reports it parsed, so a report that did not change since the last
    snapshot is not parsed again (at 10,000 machines parsing them all is most of a snapshot's cost)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float | None, ReplicationReport | None]] = {}
        self.generation = 0

    def report(self, row: FleetRow) -> ReplicationReport | None:
        cached = self._reports.get(row.host_id)
        if cached is not None and cached[0] == row.reported_at:
            return cached[1]
        report = stored_report(row.report_json) if row.report_json else None
        self._reports[row.host_id] = (row.reported_at, report)
        return report

    def build(
        self,
        rows: Sequence[FleetRow],
        now: float,
        *,
        newest_points: Mapping[str, float] | None = None,
        store: StoreFigures | None = None,
        rollouts: list[tuple[Rollout, dict[str, int]]] | None = None,
        build_seconds: float = 0.0,
    ) -> Snapshot:
        points = newest_points or {}
        machines: list[MachineView] = []
        disks: list[DiskView] = []
        seen: set[str] = set()
        for row in rows:
            seen.add(row.host_id)
            view = machine_view(row, self.report(row) if row.policy else None, points.get(row.host_id), now)
            machines.append(view)
            disks.extend(view.disks)
        for gone in set(self._reports) - seen:
            del self._reports[gone]
        disks.sort(key=_disk_order)
        self.generation += 1
        snap = Snapshot(
            now, build_seconds, tuple(machines), tuple(disks), store, rollouts or [], generation=self.generation
        )
        snap.by_id = {m.host_id: m for m in machines}
        snap.disk_errors = tuple(d for d in snap.disks if d.error)
        snap.counts = _counts(machines)
        return snap


def _disk_order(d: DiskView) -> tuple[bool, float, str, str]:
    """RPO breaches first, then the disks nearest their target."""
    ratio = (d.lag_now or 0.0) / d.rpo if d.rpo > 0 else 0.0
    return (not d.breach, -ratio, d.hostname, d.disk)


def machine_view(
    row: FleetRow, report: ReplicationReport | None, newest_point: float | None, now: float
) -> MachineView:
    if row.revoked_at is not None:
        state = REVOKED
    elif row.last_seen is None:
        state = NEVER_SEEN
    else:
        state = ONLINE if row.online(now) else OFFLINE
    policy = row.policy
    disks: tuple[DiskView, ...] = ()
    if policy is None:
        protection = UNPROTECTED
    else:
        stale = state != ONLINE
        age = max(0.0, now - row.reported_at) if row.reported_at is not None else None
        rpo = policy.rpo_seconds
        views = []
        for d in report.disks if report else ():
            lag = _finite(d.lag_seconds)
            lag_now = lag
            if stale and age is not None:
                lag_now = (lag or 0.0) + age
            views.append(
                DiskView(
                    row.host_id,
                    row.hostname,
                    d.disk,
                    d.state,
                    d.size,
                    d.bytes_left,
                    lag,
                    lag_now,
                    _finite(d.throughput_bps) or 0.0,
                    _finite(d.eta_seconds),
                    _finite(d.last_point),
                    d.error,
                    d.detail,
                    rpo,
                    row.reported_at,
                    stale,
                    lag_now is not None and lag_now > rpo,
                )
            )
        if len(views) > 1:
            views.sort(key=lambda v: v.disk)
        disks = tuple(views)
        if disks:
            protection = max((d.state for d in disks), key=lambda s: _SEVERITY.get(s, 9))
        else:
            protection = "PAUSED" if row.paused else WAITING
    lags = [d.lag_now for d in disks if d.lag_now is not None]
    return MachineView(
        host_id=row.host_id,
        hostname=row.hostname,
        os_tag=row.os_tag,
        version=row.agent_version,
        last_seen=row.last_seen,
        state=state,
        health=row.health or "unknown",
        protection=protection,
        policy=policy.name if policy else None,
        rpo=policy.rpo_seconds if policy else None,
        interval=policy.interval_seconds if policy else None,
        lag=max(lags) if lags else None,
        breach=any(d.breach for d in disks),
        newest_point=newest_point,
        pinned=row.pinned_version,
        cloned_from=row.cloned_from,
        disks=disks,
    )


def _counts(machines: Iterable[MachineView]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {"state": {}, "health": {}, "os_tag": {}, "version": {}, "protection": {}}
    for m in machines:
        for name, value in (
            ("state", m.state),
            ("health", m.health),
            ("os_tag", m.os_tag),
            ("version", m.version),
            ("protection", m.protection),
        ):
            bucket = counts[name]
            bucket[value] = bucket.get(value, 0) + 1
    return counts


# Listing the fleet: filters and orders, parsed once where a request's query enters ----------------------------------

SORT_KEYS: dict[str, Callable[[MachineView], Any]] = {
    "hostname": lambda m: (m.hostname, m.host_id),
    "host_id": lambda m: m.host_id,
    "os_tag": lambda m: (m.os_tag, m.hostname, m.host_id),
    "version": lambda m: (_version_key(m.version), m.hostname, m.host_id),
    "last_seen": lambda m: (m.last_seen or 0.0, m.host_id),
    "state": lambda m: (MACHINE_STATES.index(m.state), m.hostname, m.host_id),
    "health": lambda m: (_HEALTH_ORDER.get(m.health, 2), m.hostname, m.host_id),
    "protection": lambda m: (-_SEVERITY.get(m.protection, -1), m.hostname, m.host_id),
    "lag": lambda m: (m.ratio, m.lag or 0.0, m.host_id),
}


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return ()


@dataclass(frozen=True)
class MachineQuery:
    text: str = ""  # part of a hostname or host ID
    state: str | None = None
    health: str | None = None
    os_tag: str | None = None
    version: str | None = None
    protection: str | None = None  # a PROTECTION_STATES entry, or "breach"
    sort: str = "hostname"
    descending: bool = False
    offset: int = 0
    limit: int = 100

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> MachineQuery:
        """From a request's query string (BAD-REQUEST for a value not in its set or past its bounds)."""
        text = params.get("q", "").strip().lower()
        if len(text) > 100:
            raise BadRequest("q: at most 100 characters")
        order = params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise BadRequest("order: asc or desc")
        sort = params.get("sort", "hostname")
        if sort not in SORT_KEYS:
            raise BadRequest(f"sort: one of {', '.join(SORT_KEYS)}")
        return cls(
            text=text,
            state=_choice(params, "state", MACHINE_STATES),
            health=_choice(params, "health", HEALTH_STATES),
            os_tag=_short(params, "os_tag"),
            version=_short(params, "version"),
            protection=_choice(params, "protection", (*PROTECTION_STATES, "breach")),
            sort=sort,
            descending=order == "desc",
            offset=_number(params, "offset", 0, 10**7, 0),
            limit=_number(params, "limit", 1, MAX_PAGE, 100),
        )

    def matches(self, m: MachineView) -> bool:
        if self.state is not None and m.state != self.state:
            return False
        if self.health is not None and m.health != self.health:
            return False
        if self.os_tag is not None and m.os_tag != self.os_tag:
            return False
        if self.version is not None and m.version != self.version:
            return False
        if self.protection == "breach":
            if not m.breach:
                return False
        elif self.protection is not None and m.protection != self.protection:
            return False
        return not self.text or self.text in m.hostname.lower() or self.text in m.host_id


def _choice(params: Mapping[str, str], name: str, choices: Sequence[str]) -> str | None:
    value = params.get(name) or None
    if value is not None and value not in choices:
        raise BadRequest(f"{name}: one of {', '.join(choices)}")
    return value


def _short(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name) or None
    if value is not None and len(value) > 64:
        raise BadRequest(f"{name}: at most 64 characters")
    return value


def _number(params: Mapping[str, str], name: str, low: int, high: int, default: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 8 or not low <= int(text) <= high:
        raise BadRequest(f"{name}: a whole number from {low} to {high}")
    return int(text)


def machines_page(snap: Snapshot, query: MachineQuery) -> tuple[int, list[MachineView]]:
    """How many machines match, and the page of them asked for."""
    matching = [m for m in snap.ordered(query.sort, query.descending) if query.matches(m)]
    return len(matching), matching[query.offset : query.offset + query.limit]


@dataclass(frozen=True)
class DiskQuery:
    text: str = ""
    state: str | None = None
    breach_only: bool = False
    offset: int = 0
    limit: int = 100

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> DiskQuery:
        text = params.get("q", "").strip().lower()
        if len(text) > 100:
            raise BadRequest("q: at most 100 characters")
        return cls(
            text=text,
            state=_choice(params, "state", STATES),
            breach_only=params.get("breach", "") in ("1", "true", "yes"),
            offset=_number(params, "offset", 0, 10**7, 0),
            limit=_number(params, "limit", 1, MAX_PAGE, 100),
        )

    def matches(self, d: DiskView) -> bool:
        if self.breach_only and not d.breach:
            return False
        if self.state is not None and d.state != self.state:
            return False
        return not self.text or self.text in d.hostname.lower() or self.text in d.host_id or self.text in d.disk


def disks_page(snap: Snapshot, query: DiskQuery) -> tuple[int, list[DiskView]]:
    matching = [d for d in snap.disks if query.matches(d)]
    return len(matching), matching[query.offset : query.offset + query.limit]
