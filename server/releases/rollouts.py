"""Rollouts of an agent version to the fleet, in waves, with a failure budget; and pins (docs/updates.md).

A rollout names a version and the machines it is for (``--all``, an OS tag, or a list), cut into waves (``--wave
10%`` or a count; machines in host-ID order, which is random but stable). Machines learn their target in the
heartbeat answer (the ``update`` field: version and the upgrade job to report under). The rollout advances to the
next wave only when every machine of the current one has ended its upgrade job and is verified on the new version:
its heartbeat says so, it is online, and its health is not critical. A failed job (a rollback, a download that
failed, a machine that did not finish within ``--wave-timeout``) counts against ``--max-failures``; at that count
the rollout halts: machines of the current wave that had not started are withdrawn, later waves are never offered,
and the listing names the failing machines and their error IDs.

A machine whose upgrade failed is pinned to the version it ran before, until an operator unpins it; a pin also
keeps a machine out of later rollouts, and ``pin --to VERSION`` moves it to that version on its own.

Everything is in the database, nothing in a process: any server instance (or none, between two ``serve`` runs) may
advance a rollout, each pass in one write transaction (serialised across instances on PostgreSQL by an advisory
lock), derived again from the jobs the machines reported (a pass killed halfway leaves nothing half-written, and the
next one finds the same state). A pass reads the members of the running rollouts only: O(machines in rollouts), by
primary key and index, in a worker thread, never in a request."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update

from agent.shared.errors import BadArguments
from agent.shared.textsafe import shown
from agent.shared.wire import UpdateTarget
from server.database.schema import jobs, machines, rollout_machines, rollouts
from server.database.storage import Credential, Machine, Storage, Tx
from server.errors import (
    MachineNotFound,
    RolloutDowngrade,
    RolloutHalted,
    RolloutNoBundle,
    RolloutNoMachines,
    RolloutNotRunning,
    RolloutRunning,
    UpdateTimedOut,
)

DEFAULT_WAVE = "10%"
DEFAULT_MAX_FAILURES = 1
DEFAULT_WAVE_TIMEOUT = 1800.0
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){1,7}")  # each part a number a 32-bit field holds
_WAVE = re.compile(r"^(\d{1,6})(%?)$")
_SUCCEEDED = ("succeeded", "succeeded with warnings")

# A member's state in a rollout.
WAITING, OFFERED, SUCCEEDED, FAILED, SKIPPED, WITHDRAWN = (
    "waiting",
    "offered",
    "succeeded",
    "failed",
    "skipped",
    "withdrawn",
)
RUNNING, HALTED, COMPLETED = "running", "halted", "completed"


def parse_version(text: str) -> str:
    if not _VERSION.fullmatch(text):
        raise BadArguments(
            f"{shown(text, 40)} is not a version: give dotted numbers (up to 9 digits each), e.g. 0.1.1",
            fix="Give the version as dotted numbers, as `mobility-server repo list` names the bundles (e.g. 0.1.1).",
        )
    return text


def parse_wave(text: str) -> tuple[int, bool]:
    """``10%`` -> (10, True), ``3`` -> (3, False): a share of the selected machines, or a count."""
    m = _WAVE.match(text.strip())
    if not m or int(m.group(1)) == 0 or (m.group(2) and int(m.group(1)) > 100):
        raise BadArguments(
            f"--wave {shown(text, 80)} is not a wave size",
            fix="Give --wave a share of the selected machines such as 10% (1-100%) or a number of machines such as 3.",
        )
    return int(m.group(1)), bool(m.group(2))


def _is_newer(running: str, target: str) -> bool:
    """Whether ``running`` is a later version than ``target`` (a version that is not one compares as older)."""
    if not (_VERSION.fullmatch(running) and _VERSION.fullmatch(target)):
        return False
    return tuple(map(int, running.split("."))) > tuple(map(int, target.split(".")))


def wave_size(wave: tuple[int, bool], total: int) -> int:
    """Machines per wave (at least one). Pure."""
    n, percent = wave
    return max(1, math.ceil(total * n / 100)) if percent else n


def plan_waves(host_ids: Iterable[str], size: int) -> list[tuple[str, int]]:
    """(host ID, wave number from 1) in host-ID order: random (IDs are UUIDs) but the same at every look. Pure."""
    return [(host_id, i // size + 1) for i, host_id in enumerate(sorted(host_ids))]


@dataclass(frozen=True)
class Selection:
    """Which machines a rollout is for: all, one OS tag, or a list of host IDs."""

    all: bool = False
    os_tag: str | None = None
    machines: tuple[str, ...] = ()

    def matches(self, m: Machine) -> bool:
        return self.all or (self.os_tag is not None and m.os_tag == self.os_tag) or m.host_id in self.machines

    def describe(self) -> str:
        if self.all:
            return "all machines"
        if self.os_tag is not None:
            return f"OS tag {self.os_tag}"
        return f"{len(self.machines)} machine(s)"

    def to_json(self) -> dict[str, Any]:
        return {"all": self.all, "os_tag": self.os_tag, "machines": list(self.machines)}

    @classmethod
    def stored(cls, text: str) -> Selection:
        try:
            doc = json.loads(text)
            return cls(bool(doc.get("all")), doc.get("os_tag"), tuple(str(m) for m in doc.get("machines", [])))
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    to_version: str
    selection: Selection
    wave_size: int
    waves: int
    current_wave: int
    max_failures: int
    wave_timeout: float
    state: str
    reason: str | None
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "to_version": self.to_version,
            "selection": self.selection.to_json(),
            "wave_size": self.wave_size,
            "waves": self.waves,
            "current_wave": self.current_wave,
            "max_failures": self.max_failures,
            "wave_timeout": self.wave_timeout,
            "state": self.state,
            "reason": self.reason,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_RM = rollout_machines
_MEMBERS = (
    select(
        _RM.c.host_id,
        func.coalesce(machines.c.hostname, "-"),
        _RM.c.wave,
        _RM.c.from_version,
        _RM.c.state,
        _RM.c.job_id,
        _RM.c.error_id,
        _RM.c.detail,
        _RM.c.offered_at,
        machines.c.agent_version,
        machines.c.health,
        jobs.c.state,
        jobs.c.created_at,
        jobs.c.updated_at,
        jobs.c.error_id,
        jobs.c.detail,
        machines.c.last_seen,
        machines.c.heartbeat_interval,
        machines.c.pinned_version,
    )
    .select_from(
        _RM.outerjoin(machines, machines.c.host_id == _RM.c.host_id).outerjoin(jobs, jobs.c.job_id == _RM.c.job_id)
    )
    .order_by(_RM.c.wave, _RM.c.host_id)
)
_LOCK = "mobility:rollouts"  # one pass at a time across instances (an advisory transaction lock on PostgreSQL)


def _rollout(row: Any) -> Rollout:
    values = list(row)
    values[2] = Selection.stored(values[2])
    return Rollout(*values)


def _health(text: object) -> str | None:
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    status = doc.get("status") if isinstance(doc, dict) else None
    return status if isinstance(status, str) else None


@dataclass(frozen=True)
class Member:
    """A machine in a rollout, with what its job and its heartbeats say now (the columns of _MEMBERS): what a pass
    decides on and what the operator is shown, in one."""

    host_id: str
    hostname: str
    wave: int
    from_version: str
    state: str
    job_id: str | None
    error_id: str | None  # the member's, else its failed job's
    detail: str | None  # the member's, else its job's
    offered_at: float | None
    agent_version: str | None
    health: str | None  # the status of its last health report
    job_state: str | None
    job_created: float | None
    job_updated: float | None
    job_error: str | None
    job_detail: str | None
    last_seen: float | None
    interval: float | None
    pinned: str | None

    @classmethod
    def from_row(cls, row: Any) -> Member:
        values = list(row)
        m = cls(*values)
        return replace(
            m,
            error_id=m.error_id or (m.job_error if m.state == FAILED else None),
            detail=m.detail if m.detail else m.job_detail,
            health=_health(m.health),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "hostname": self.hostname,
            "wave": self.wave,
            "from_version": self.from_version,
            "state": self.state,
            "job_id": self.job_id,
            "job_state": self.job_state,
            "error_id": self.error_id,
            "detail": self.detail,
            "agent_version": self.agent_version,
            "health": self.health,
        }

    def online(self, now: float) -> bool:
        return self.last_seen is not None and now - self.last_seen <= 3 * (self.interval or 30.0)

    @property
    def started(self) -> bool:
        """Whether the machine reported on its job since the server created it."""
        return self.job_updated is not None and self.job_created is not None and self.job_updated > self.job_created


def _members(conn: Connection, rollout_id: str) -> list[Member]:
    return [Member.from_row(r) for r in conn.execute(_MEMBERS.where(_RM.c.rollout_id == rollout_id))]


def _load(conn: Connection, rollout_id: str) -> Rollout:
    return _rollout(conn.execute(select(rollouts).where(rollouts.c.rollout_id == rollout_id)).one())


class Rollouts:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # Operator commands ------------------------------------------------------------------------------------------

    def start(
        self,
        to_version: str,
        selection: Selection,
        wave: tuple[int, bool],
        max_failures: int,
        wave_timeout: float,
        published: set[tuple[str, str]],
        now: float,
        allow_downgrade: bool = False,
    ) -> tuple[Rollout, list[Member]]:
        """A new rollout, its first wave offered at once. ``published``: (version, OS tag) of the repository. A
        version older than one a selected machine runs is refused unless ``allow_downgrade``: versions move
        forward (``pin --to`` is the explicit way back for a machine)."""
        with self.storage.transaction() as tx:
            tx.lock(_LOCK)
            running = tx.conn.execute(select(rollouts.c.rollout_id).where(rollouts.c.state == RUNNING)).first()
            if running:
                raise RolloutRunning(f"rollout {running[0]} is running")
            fleet = tx.all_machines()
            known = {m.host_id for m in fleet}
            unknown = [h for h in selection.machines if h not in known]
            if unknown:
                raise MachineNotFound(f"no machine {', '.join(unknown)} is registered")
            chosen = [m for m in fleet if selection.matches(m)]
            if not chosen:
                raise RolloutNoMachines(f"no registered machine matches {selection.describe()}")
            newer = sorted(
                (m for m in chosen if not m.pinned_version and _is_newer(m.agent_version, to_version)),
                key=lambda m: m.host_id,
            )
            if newer and not allow_downgrade:
                named = ", ".join(f"{m.hostname} ({m.host_id}) runs {m.agent_version}" for m in newer[:5])
                more = f" and {len(newer) - 5} more" if len(newer) > 5 else ""
                raise RolloutDowngrade(f"{to_version} is older than what {len(newer)} machine(s) run: {named}{more}")
            missing = sorted({m.os_tag for m in chosen if (to_version, m.os_tag) not in published})
            if missing:
                raise RolloutNoBundle(f"the repository has no {to_version} bundle for {', '.join(missing)}")
            size = wave_size(wave, len(chosen))
            plan = plan_waves((m.host_id for m in chosen), size)
            rollout_id = str(uuid.uuid4())
            tx.conn.execute(
                insert(rollouts).values(
                    rollout_id=rollout_id,
                    to_version=to_version,
                    selection=json.dumps(selection.to_json()),
                    wave_size=size,
                    waves=max(w for _, w in plan),
                    current_wave=0,
                    max_failures=max_failures,
                    wave_timeout=wave_timeout,
                    state=RUNNING,
                    reason=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            by_id = {m.host_id: m for m in chosen}
            tx.conn.execute(
                insert(_RM),
                [
                    {
                        "rollout_id": rollout_id,
                        "host_id": host_id,
                        "wave": w,
                        "from_version": by_id[host_id].agent_version,
                        "state": SKIPPED if by_id[host_id].pinned_version else WAITING,
                        "detail": f"pinned to {by_id[host_id].pinned_version}"
                        if by_id[host_id].pinned_version
                        else None,
                        "updated_at": now,
                    }
                    for host_id, w in plan
                ],
            )
            self._advance(tx, rollout_id, now)
        return self.show(rollout_id)

    def halt(self, reason: str, now: float) -> tuple[Rollout, list[Member]]:
        with self.storage.transaction() as tx:
            tx.lock(_LOCK)
            row = tx.conn.execute(select(rollouts.c.rollout_id).where(rollouts.c.state == RUNNING)).first()
            if row is None:
                raise RolloutNotRunning("no rollout is running")
            self._halt(tx.conn, row[0], reason, now)
        return self.show(row[0])

    def advance(self, now: float) -> list[str]:
        """One pass over the running rollouts: what changed, for the server's log."""
        with self.storage.reading() as tx:
            if tx.conn.execute(select(rollouts.c.rollout_id).where(rollouts.c.state == RUNNING)).first() is None:
                return []  # the usual case, and no write transaction for it
        changes: list[str] = []
        with self.storage.transaction() as tx:
            tx.lock(_LOCK)
            running = tx.conn.execute(select(rollouts.c.rollout_id).where(rollouts.c.state == RUNNING)).scalars()
            for rollout_id in list(running):
                changes += self._advance(tx, rollout_id, now)
        return changes

    def show(self, rollout_id: str) -> tuple[Rollout, list[Member]]:
        with self.storage.reading() as tx:
            return _load(tx.conn, rollout_id), _members(tx.conn, rollout_id)

    def listing(self, limit: int = 20) -> list[tuple[Rollout, list[Member]]]:
        """The newest rollouts, each with its machines."""
        with self.storage.reading() as tx:
            ids = tx.conn.execute(
                select(rollouts.c.rollout_id).order_by(rollouts.c.created_at.desc()).limit(limit)
            ).scalars()
            return [(_load(tx.conn, i), _members(tx.conn, i)) for i in list(ids)]

    def newest(self, limit: int = 10) -> list[Rollout]:
        """The newest rollouts (by the rollouts_by_created index)."""
        with self.storage.reading() as tx:
            query = select(rollouts).order_by(rollouts.c.created_at.desc()).limit(limit)
            return [_rollout(r) for r in tx.conn.execute(query)]

    def counts(self, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
        """How many machines of each rollout are in each state, counted by the database over the rollouts' key (the
        dashboard and /metrics never load a big rollout's machines to count them; they count a finished rollout's
        once: its machines no longer move)."""
        counts: dict[str, dict[str, int]] = {r: {} for r in rollout_ids}
        if rollout_ids:
            with self.storage.reading() as tx:
                rows = tx.conn.execute(
                    select(_RM.c.rollout_id, _RM.c.state, func.count())
                    .where(_RM.c.rollout_id.in_(rollout_ids))
                    .group_by(_RM.c.rollout_id, _RM.c.state)
                )
                for rollout_id, state, n in rows:
                    counts[str(rollout_id)][str(state)] = int(n)
        return counts

    def page(
        self, rollout_id: str, *, states: tuple[str, ...] = (), offset: int = 0, limit: int = 100
    ) -> tuple[Rollout | None, int, list[Member], dict[str, int]]:
        """One page of a rollout's machines (in ``states``, if given), in wave and host-ID order, how many match, and
        how many are in each state: the dashboard shows a rollout of any size a page at a time."""
        where = _RM.c.rollout_id == rollout_id
        if states:
            where = and_(where, _RM.c.state.in_(list(states)))
        with self.storage.reading() as tx:
            row = tx.conn.execute(select(rollouts).where(rollouts.c.rollout_id == rollout_id)).first()
            if row is None:
                return None, 0, [], {}
            total = int(tx.conn.execute(select(func.count()).select_from(_RM).where(where)).scalar_one())
            page = tx.conn.execute(_MEMBERS.where(where).offset(offset).limit(limit))
            members = [Member.from_row(r) for r in page]
            counts = {
                str(state): int(n)
                for state, n in tx.conn.execute(
                    select(_RM.c.state, func.count()).where(_RM.c.rollout_id == rollout_id).group_by(_RM.c.state)
                )
            }
        return _rollout(row), total, members, counts

    def pin(
        self, host_ids: list[str], version: str | None, reason: str, published: set[tuple[str, str]], now: float
    ) -> list[Machine]:
        """Keep machines at ``version`` (default: the one each runs); a machine told another version than it runs
        gets an upgrade job for that move."""
        with self.storage.transaction() as tx:
            found = self._known(tx, host_ids)
            missing = sorted(
                {m.os_tag for m in found if version not in (None, m.agent_version)
                 and (version, m.os_tag) not in published})  # fmt: skip
            if missing:
                raise RolloutNoBundle(f"the repository has no {version} bundle for {', '.join(missing)}")
            for m in found:
                pinned = version or m.agent_version
                job = None
                if pinned != m.agent_version:
                    job = self._offer_job(tx, m, pinned, f"pinned to {pinned} by an operator", now)
                tx.conn.execute(
                    update(machines)
                    .where(machines.c.host_id == m.host_id)
                    .values(pinned_version=pinned, pin_reason=reason, target_version=pinned, target_job=job)
                )
            return [tx.machine(h) or m for h, m in zip(host_ids, found, strict=True)]

    def unpin(self, host_ids: list[str]) -> list[Machine]:
        """The machines follow rollouts again (the next one that includes them)."""
        with self.storage.transaction() as tx:
            found = self._known(tx, host_ids)
            for m in found:
                tx.conn.execute(
                    update(machines)
                    .where(machines.c.host_id == m.host_id)
                    .values(pinned_version=None, pin_reason=None, target_version=None, target_job=None)
                )
            return [tx.machine(h) or m for h, m in zip(host_ids, found, strict=True)]

    # One pass -----------------------------------------------------------------------------------------------

    def _advance(self, tx: Tx, rollout_id: str, now: float) -> list[str]:
        conn = tx.conn
        changes: list[str] = []
        for _ in range(10_000):  # bounded: each turn opens a wave or ends the rollout
            rollout = _load(conn, rollout_id)
            if rollout.state != RUNNING:
                return changes
            for row in _members(conn, rollout_id):
                if row.state == OFFERED and row.wave <= rollout.current_wave:
                    changes += self._settle(tx, rollout, row, now)
            rows = _members(conn, rollout_id)
            failed = [r for r in rows if r.state == FAILED]
            if len(failed) >= rollout.max_failures:
                shown = "; ".join(
                    f"{r.hostname} ({r.host_id}): {r.error_id or r.job_error or 'failed'}" for r in failed
                )
                self._halt(conn, rollout_id, f"{len(failed)} failed (at most {rollout.max_failures}): {shown}", now)
                return [*changes, f"rollout {rollout_id} halted: {shown}"]
            if any(r.state == OFFERED for r in rows):
                return changes
            if rollout.current_wave >= rollout.waves:
                self._set(conn, rollout_id, now, state=COMPLETED)
                return [*changes, f"rollout {rollout_id} to {rollout.to_version} completed"]
            wave = rollout.current_wave + 1
            self._set(conn, rollout_id, now, current_wave=wave)
            for row in rows:
                if row.wave == wave and row.state == WAITING:
                    self._open(tx, rollout, row, now)
            changes.append(f"rollout {rollout_id}: wave {wave} of {rollout.waves} offered {rollout.to_version}")
        return changes

    def _open(self, tx: Tx, rollout: Rollout, row: Member, now: float) -> None:
        machine = tx.machine(row.host_id)
        if machine is None:
            self._member(tx.conn, rollout, row.host_id, SKIPPED, None, "the machine was removed", now)
        elif machine.pinned_version is not None:
            self._member(tx.conn, rollout, row.host_id, SKIPPED, None, f"pinned to {machine.pinned_version}", now)
        elif machine.agent_version == rollout.to_version:
            self._member(tx.conn, rollout, row.host_id, SUCCEEDED, None, f"already runs {rollout.to_version}", now)
        else:
            detail = f"offered {rollout.to_version} (rollout {rollout.rollout_id}, wave {row.wave} of {rollout.waves})"
            job = self._offer_job(tx, machine, rollout.to_version, detail, now)
            tx.conn.execute(
                update(machines)
                .where(machines.c.host_id == machine.host_id)
                .values(target_version=rollout.to_version, target_job=job)
            )
            tx.conn.execute(
                update(_RM)
                .where(and_(_RM.c.rollout_id == rollout.rollout_id, _RM.c.host_id == row.host_id))
                .values(state=OFFERED, job_id=job, from_version=machine.agent_version, offered_at=now, updated_at=now)
            )

    def _settle(self, tx: Tx, rollout: Rollout, row: Member, now: float) -> list[str]:
        """An offered member: ended (its job), verified on the new version, or out of time."""
        conn = tx.conn
        if row.job_state == "failed":
            error = row.job_error
            self._member(conn, rollout, row.host_id, FAILED, error, None, now)
            why = f"upgrade to {rollout.to_version} failed ({error or 'no error ID'}): pinned to {row.from_version}"
            self._pin_back(conn, row, why)
            return [f"{row.hostname} ({row.host_id}): {why}"]
        verified = (
            row.job_state in _SUCCEEDED
            and row.agent_version == rollout.to_version
            and row.online(now)
            and row.health != "critical"
        )
        if verified:
            self._member(conn, rollout, row.host_id, SUCCEEDED, None, None, now)
            return [f"{row.hostname} ({row.host_id}) runs {rollout.to_version}"]
        if row.offered_at is not None and now - row.offered_at > rollout.wave_timeout:
            where = f"its job {row.job_state}, it runs {row.agent_version}, health {row.health or 'unknown'}"
            timed_out = UpdateTimedOut(
                f"not verified on {rollout.to_version} within the wave timeout ({rollout.wave_timeout:.0f} s): {where}"
            )
            self._member(conn, rollout, row.host_id, FAILED, timed_out.code, timed_out.message, now)
            if row.job_state not in _SUCCEEDED:
                self._end_job(conn, row, timed_out.code, timed_out.fix, timed_out.message, now)
            self._withdraw(conn, row)
            return [f"{row.hostname} ({row.host_id}): {timed_out.message}"]
        return []

    def _halt(self, conn: Connection, rollout_id: str, reason: str, now: float) -> None:
        rollout = _load(conn, rollout_id)
        halted = RolloutHalted(f"rollout {rollout_id} halted before this machine started its upgrade: {reason}")
        for row in _members(conn, rollout_id):
            if row.state == OFFERED and not row.started:
                self._member(conn, rollout, row.host_id, WITHDRAWN, None, "the rollout halted before it started", now)
                self._end_job(conn, row, halted.code, halted.fix, halted.message, now)
                self._withdraw(conn, row)
        self._set(conn, rollout_id, now, state=HALTED, reason=reason[:4000])

    # Rows -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _set(conn: Connection, rollout_id: str, now: float, **values: object) -> None:
        conn.execute(update(rollouts).where(rollouts.c.rollout_id == rollout_id).values(**values, updated_at=now))

    @staticmethod
    def _offer_job(tx: Tx, m: Machine, version: str, detail: str, now: float) -> str:
        job_id = str(uuid.uuid4())
        values = {
            "job_id": job_id,
            "host_id": m.host_id,
            "hostname": m.hostname,
            "kind": "upgrade",
            "state": "running",
            "error_id": None,
            "remediation": None,
            "detail": detail,
        }
        tx.upsert_job(values, now, f"host:{m.host_id}")  # the machine, and only it, reports on it
        return job_id

    @staticmethod
    def _end_job(conn: Connection, row: Member, error_id: str, fix: str, detail: str, now: float) -> None:
        conn.execute(
            update(jobs)
            .where(and_(jobs.c.job_id == row.job_id, jobs.c.state == "running"))
            .values(state="failed", error_id=error_id, remediation=fix, detail=detail[:4000], updated_at=now)
        )

    @staticmethod
    def _withdraw(conn: Connection, row: Member) -> None:
        conn.execute(
            update(machines)
            .where(and_(machines.c.host_id == row.host_id, machines.c.target_job == row.job_id))
            .values(target_version=None, target_job=None)
        )

    @staticmethod
    def _pin_back(conn: Connection, row: Member, reason: str) -> None:
        """A machine whose upgrade failed stays at the version it ran before, until an operator unpins it."""
        conn.execute(
            update(machines)
            .where(
                and_(
                    machines.c.host_id == row.host_id,
                    or_(machines.c.target_job == row.job_id, machines.c.target_job.is_(None)),
                    machines.c.pinned_version.is_(None),
                )
            )
            .values(
                pinned_version=row.from_version,
                pin_reason=reason[:1000],
                target_version=row.from_version,
                target_job=None,
            )
        )

    @staticmethod
    def _member(
        conn: Connection,
        rollout: Rollout,
        host_id: str,
        state: str,
        error_id: str | None,
        detail: str | None,
        now: float,
    ) -> None:
        conn.execute(
            update(_RM)
            .where(and_(_RM.c.rollout_id == rollout.rollout_id, _RM.c.host_id == host_id))
            .values(state=state, error_id=error_id, detail=func.coalesce(detail, _RM.c.detail), updated_at=now)
        )

    @staticmethod
    def _known(tx: Tx, host_ids: list[str]) -> list[Machine]:
        found = [tx.machine(h) for h in host_ids]
        unknown = [h for h, m in zip(host_ids, found, strict=True) if m is None]
        if unknown:
            raise MachineNotFound(f"no machine {', '.join(unknown)} is registered")
        return [m for m in found if m is not None]


def pin_back_failed_pin(tx: Tx, host_id: str, job_id: str, runs: str | None, error_id: str | None) -> str | None:
    """A machine reported that its move under a pin (``pin --to``) failed: it is pinned to the version it runs, with
    the failure as the reason, as a failed rollout member is (a rollout's moves are settled by its pass, which knows
    the version each member ran). The version it runs is what its report says, else what its heartbeats last said
    if that is not the failed version; without either the pin stays where it was, with the reason. Runs in the
    report's transaction; returns what changed, for the server's log."""
    m = tx.machine(host_id)
    if m is None or m.target_job != job_id or m.pinned_version is None or m.target_version is None:
        return None
    failed = m.target_version
    back = runs if runs is not None else (m.agent_version if m.agent_version != failed else None)
    why = f"move to {failed} (pinned by an operator) failed ({error_id or 'no error ID'})"
    pinned = back if back is not None and back != failed else failed
    reason = f"{why}: pinned to {pinned}" if pinned != failed else f"{why}: the version it runs is not known yet"
    tx.conn.execute(
        update(machines)
        .where(and_(machines.c.host_id == host_id, machines.c.target_job == job_id))
        .values(pinned_version=pinned, pin_reason=reason[:1000], target_version=pinned, target_job=None)
    )
    return f"{m.hostname} ({host_id}): {reason}"


def target_of(m: Machine | Credential) -> UpdateTarget | None:
    """What a heartbeat answer tells the machine: its target version (and job), or nothing."""
    if m.target_version is None:
        return None
    return UpdateTarget(m.target_version, m.target_job, m.pinned_version is not None)
