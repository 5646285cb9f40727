"""Jobs: what a machine, a push or the server itself reports it is doing or did (install, upgrade, failover), and
who may report on each (its owner: the host over mutual TLS, the token it was pushed with, the passphrase). A job
is committed before the response acknowledges it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, Unpack

from sqlalchemy import and_, func, select, update

from server.database.schema import jobs, machines
from server.database.transactions import Access, TxBase, db_errors, dialect_insert
from server.errors import JobNotOwned


@dataclass(frozen=True)
class Job:
    job_id: str
    host_id: str | None
    hostname: str
    kind: str
    state: str
    error_id: str | None
    remediation: str | None
    detail: str | None
    created_at: float
    updated_at: float
    owner: str | None = None  # who may update it: "host:<id>", "token:<id>" or "passphrase"


class JobRows(TxBase):
    """The jobs' queries inside one transaction."""

    def may_write(self, principal: str, owner: str | None, host_id: str | None) -> bool:
        if owner is None:  # a job written before jobs had owners: only its own host
            return host_id is not None and principal == f"host:{host_id}"
        if owner == principal:
            return True
        if owner.startswith("token:") and principal.startswith("host:"):
            enrolled = self.conn.execute(
                select(1).where(
                    and_(
                        machines.c.host_id == principal.removeprefix("host:"),
                        machines.c.enrol_token_id == owner.removeprefix("token:"),
                    )
                )
            ).first()
            return enrolled is not None
        return False

    def insert_job_if_absent(self, values: dict[str, Any], now: float, owner: str | None) -> bool:
        return self.insert_ignore(jobs, {**values, "created_at": now, "updated_at": now, "owner": owner})

    def upsert_job(self, values: dict[str, Any], now: float, owner: str | None) -> None:
        stmt = dialect_insert(self.postgresql)(jobs).values(**values, created_at=now, updated_at=now, owner=owner)
        self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[jobs.c.job_id],
                set_={
                    "state": stmt.excluded.state,
                    "error_id": stmt.excluded.error_id,
                    "remediation": stmt.excluded.remediation,
                    "detail": stmt.excluded.detail,
                    "updated_at": stmt.excluded.updated_at,
                    "host_id": func.coalesce(stmt.excluded.host_id, jobs.c.host_id),
                    "owner": func.coalesce(jobs.c.owner, stmt.excluded.owner),
                },
            )
        )

    def fail_running_job(self, job_id: str | None, error_id: str, fix: str, detail: str, now: float) -> None:
        """End a job the server gave up on (a rollout's member out of time, withdrawn), if it is still running."""
        self.conn.execute(
            update(jobs)
            .where(and_(jobs.c.job_id == job_id, jobs.c.state == "running"))
            .values(state="failed", error_id=error_id, remediation=fix, detail=detail[:4000], updated_at=now)
        )

    def locked_owner(self, job_id: str) -> tuple[str | None, str | None] | None:
        """A job's owner and host, locked for the rest of the transaction (None: no such job)."""
        row = self.conn.execute(
            select(jobs.c.owner, jobs.c.host_id).where(jobs.c.job_id == job_id).with_for_update()
        ).first()
        return (row[0], row[1]) if row is not None else None


J = TypeVar("J", bound=JobRows)


class JobFields(TypedDict):
    """What a report says about a job (created_at, updated_at and owner are the writer's): its columns as given."""

    job_id: str | None  # None: a new job (an ID is made)
    host_id: str | None
    hostname: str
    kind: str
    state: str
    error_id: str | None
    remediation: str | None
    detail: str | None


class Jobs(Access[J]):
    """The jobs (``Storage``'s part of them)."""

    @db_errors
    def record_job(self, *, now: float, owner: str | None = None, **job: Unpack[JobFields]) -> str:
        """Create or update a job as the server itself (push, housekeeping): no ownership check."""
        job_id = job["job_id"] or str(uuid.uuid4())
        values = {**job, "job_id": job_id}
        with self.transaction() as tx:
            tx.upsert_job(values, now, owner)
        return job_id

    @db_errors
    def report_job(
        self,
        *,
        principals: list[str],
        now: float,
        then: Callable[[J], None] | None = None,
        **job: Unpack[JobFields],
    ) -> str:
        """Create or update a job as a client: ``principals`` are who it proved to be ("host:<id>" over mutual TLS,
        "token:<id>" or "passphrase" by a proof; the first owns a new job). A client may update only a job one of
        them owns, or, as host H, a job owned by the token H enrolled with (the job a push created for it):
        JobNotOwned otherwise. ``then`` runs in the same transaction once the report is written (what the report
        changes elsewhere, e.g. a failed move's pin: both or neither)."""
        job_id = job["job_id"] or str(uuid.uuid4())
        values = {**job, "job_id": job_id}
        with self.transaction() as tx:
            # Locked for the check and the write: two reports on one job ID cannot both pass the check.
            row = tx.locked_owner(job_id)
            if row is not None and not any(tx.may_write(p, row[0], row[1]) for p in principals):
                raise JobNotOwned(f"job {job_id} belongs to another machine or secret")
            if row is None:
                inserted = tx.insert_job_if_absent(values, now, principals[0])
                if not inserted:  # another report created it meanwhile: judge against its owner
                    row = tx.locked_owner(job_id)
                    if row is None or not any(tx.may_write(p, row[0], row[1]) for p in principals):
                        raise JobNotOwned(f"job {job_id} belongs to another machine or secret")
                else:
                    if then is not None:
                        then(tx)
                    return job_id
            tx.upsert_job(values, now, principals[0])
            if then is not None:
                then(tx)
        return job_id

    @db_errors
    def set_job_owner(self, job_id: str, owner: str) -> None:
        """Bind a job the server created (a push) to the secret the host will prove: only it may report on it."""
        with self.transaction() as tx:
            tx.conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(owner=owner))

    def job(self, job_id: str) -> Job | None:
        with self.reading() as tx:
            row = tx.conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first()
            return Job(**row._mapping) if row else None

    def jobs(self) -> list[Job]:
        with self.reading() as tx:
            return [Job(**r._mapping) for r in tx.conn.execute(select(jobs).order_by(jobs.c.created_at, jobs.c.job_id))]

    def jobs_for(self, host_id: str, limit: int = 50) -> list[Job]:
        """A machine's newest jobs (by the jobs_by_host index)."""
        with self.reading() as tx:
            rows = tx.conn.execute(
                select(jobs).where(jobs.c.host_id == host_id).order_by(jobs.c.created_at.desc()).limit(limit)
            )
            return [Job(**r._mapping) for r in rows]

    def recent_jobs(self, *, kind: str | None = None, states: Iterable[str] = (), limit: int = 20) -> list[Job]:
        """The newest jobs of a kind, or in any of ``states``, newest change first: one index range each (the
        dashboard's test failovers and recent errors), never a scan of every job."""
        with self.reading() as tx:
            found: list[Job] = []
            if kind is not None:
                query = select(jobs).where(jobs.c.kind == kind).order_by(jobs.c.updated_at.desc()).limit(limit)
                found += [Job(**r._mapping) for r in tx.conn.execute(query)]
            for state in states:
                query = select(jobs).where(jobs.c.state == state).order_by(jobs.c.updated_at.desc()).limit(limit)
                found += [Job(**r._mapping) for r in tx.conn.execute(query)]
        unique = {j.job_id: j for j in found}
        return sorted(unique.values(), key=lambda j: (j.updated_at, j.job_id), reverse=True)[:limit]
