"""The rollouts' rows: each rollout (its version, selection, waves, failure budget and state) and its machines, one
row each (wave, the version it ran, its state, the upgrade job it was offered), read with what their jobs and
heartbeats say now. What a pass decides is server/releases/rollouts.py; this module only reads and writes it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import and_, func, insert, select, update

from server.database.machines import Machine
from server.database.schema import jobs, machines, rollout_machines, rollouts
from server.database.transactions import TxBase

# A member's state in a rollout.
WAITING, OFFERED, SUCCEEDED, FAILED, SKIPPED, WITHDRAWN = (
    "waiting",
    "offered",
    "succeeded",
    "failed",
    "skipped",
    "withdrawn",
)
# A rollout's state.
RUNNING, HALTED, COMPLETED = "running", "halted", "completed"


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


@dataclass(frozen=True)
class NewMember:
    """A machine as a new rollout records it: its wave, the version it runs, and whether it waits or is skipped."""

    host_id: str
    wave: int
    from_version: str
    state: str
    detail: str | None


class RolloutRows(TxBase):
    """The rollouts' queries inside one transaction."""

    def running_rollouts(self) -> list[str]:
        """The IDs of the running rollouts (by the state index; at most one is started at a time)."""
        query = select(rollouts.c.rollout_id).where(rollouts.c.state == RUNNING)
        return [str(r) for r in self.conn.execute(query).scalars()]

    def rollout(self, rollout_id: str) -> Rollout | None:
        row = self.conn.execute(select(rollouts).where(rollouts.c.rollout_id == rollout_id)).first()
        return _rollout(row) if row is not None else None

    def members(self, rollout_id: str) -> list[Member]:
        """A rollout's machines, in wave and host-ID order."""
        return [Member.from_row(r) for r in self.conn.execute(_MEMBERS.where(_RM.c.rollout_id == rollout_id))]

    def newest_rollouts(self, limit: int) -> list[Rollout]:
        """The newest rollouts (by the rollouts_by_created index)."""
        query = select(rollouts).order_by(rollouts.c.created_at.desc()).limit(limit)
        return [_rollout(r) for r in self.conn.execute(query)]

    def member_counts(self, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
        """How many machines of each rollout are in each state, counted by the database over the rollouts' key."""
        counts: dict[str, dict[str, int]] = {r: {} for r in rollout_ids}
        if rollout_ids:
            rows = self.conn.execute(
                select(_RM.c.rollout_id, _RM.c.state, func.count())
                .where(_RM.c.rollout_id.in_(rollout_ids))
                .group_by(_RM.c.rollout_id, _RM.c.state)
            )
            for rollout_id, state, n in rows:
                counts[str(rollout_id)][str(state)] = int(n)
        return counts

    def members_page(
        self, rollout_id: str, states: tuple[str, ...], offset: int, limit: int
    ) -> tuple[int, list[Member]]:
        """How many of a rollout's machines are in ``states`` (any, if none given), and one page of them in wave
        and host-ID order."""
        where = _RM.c.rollout_id == rollout_id
        if states:
            where = and_(where, _RM.c.state.in_(list(states)))
        total = int(self.conn.execute(select(func.count()).select_from(_RM).where(where)).scalar_one())
        page = self.conn.execute(_MEMBERS.where(where).offset(offset).limit(limit))
        return total, [Member.from_row(r) for r in page]

    def add_rollout(self, rollout: Rollout, members: Iterable[NewMember]) -> None:
        """Record a new rollout and its machines."""
        self.conn.execute(
            insert(rollouts).values(**{**rollout.to_json(), "selection": json.dumps(rollout.selection.to_json())})
        )
        self.conn.execute(
            insert(_RM),
            [
                {
                    "rollout_id": rollout.rollout_id,
                    "host_id": m.host_id,
                    "wave": m.wave,
                    "from_version": m.from_version,
                    "state": m.state,
                    "detail": m.detail,
                    "updated_at": rollout.created_at,
                }
                for m in members
            ],
        )

    def set_rollout(self, rollout_id: str, now: float, **values: object) -> None:
        """Change a rollout's state, current wave or reason."""
        self.conn.execute(update(rollouts).where(rollouts.c.rollout_id == rollout_id).values(**values, updated_at=now))

    def set_member(
        self, rollout_id: str, host_id: str, state: str, error_id: str | None, detail: str | None, now: float
    ) -> None:
        """A member's new state (and error); ``detail`` None keeps the one it has."""
        self.conn.execute(
            update(_RM)
            .where(and_(_RM.c.rollout_id == rollout_id, _RM.c.host_id == host_id))
            .values(state=state, error_id=error_id, detail=func.coalesce(detail, _RM.c.detail), updated_at=now)
        )

    def offer_member(self, rollout_id: str, host_id: str, job_id: str, from_version: str, now: float) -> None:
        """A member was offered the rollout's version under ``job_id``, moving from ``from_version``."""
        self.conn.execute(
            update(_RM)
            .where(and_(_RM.c.rollout_id == rollout_id, _RM.c.host_id == host_id))
            .values(state=OFFERED, job_id=job_id, from_version=from_version, offered_at=now, updated_at=now)
        )
