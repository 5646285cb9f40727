"""Rollouts of an agent version to the fleet, in waves, with a failure budget; and pins (docs/updates.md).

A rollout names a version and the machines it is for (``--all``, an OS tag, or a list), cut into waves (``--wave
10%`` or a count; machines in host-ID order, which is random but stable). Machines learn their target in the
heartbeat answer (the ``update`` field: version and the upgrade job to report under). The rollout advances to the
next wave only when every machine of the current one has ended its upgrade job and is verified on the new version:
its heartbeat says so, it is online, and its health is not critical. A failed job (a rollback, a download that
failed, a machine that did not finish within ``--wave-timeout``) counts against ``--max-failures``; at that count
the rollout halts: machines of the current wave that had not started are withdrawn, later waves are never offered,
and the listing names the failing machines and their error IDs.

A machine whose upgrade failed is pinned to the version it ran before (one out of time: to the version it runs),
until an operator unpins it; a pin also keeps a machine out of later rollouts, and ``pin --to VERSION`` moves it to
that version on its own.

Everything is in the database, nothing in a process: any server instance (or none, between two ``serve`` runs) may
advance a rollout, each pass in one write transaction (serialised across instances on PostgreSQL by an advisory
lock), derived again from the jobs the machines reported (a pass killed halfway leaves nothing half-written, and the
next one finds the same state). A pass reads the members of the running rollouts only: O(machines in rollouts), by
primary key and index, in a worker thread, never in a request."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable

from agent.shared.errors import BadArguments
from agent.shared.textsafe import shown
from agent.shared.wire import UpdateTarget
from server.database.certificates import Credential
from server.database.machines import Machine
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
    Member,
    NewMember,
    Rollout,
    Selection,
)
from server.database.storage import Storage, Tx
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
_LOCK = "mobility:rollouts"  # one pass at a time across instances (an advisory transaction lock on PostgreSQL)


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


def _load(tx: Tx, rollout_id: str) -> Rollout:
    rollout = tx.rollout(rollout_id)
    if rollout is None:  # rollouts are never deleted: an ID read from the database names one
        raise LookupError(f"no rollout {rollout_id}")
    return rollout


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
            running = tx.running_rollouts()
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
            rollout = Rollout(
                rollout_id=str(uuid.uuid4()),
                to_version=to_version,
                selection=selection,
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
            by_id = {m.host_id: m for m in chosen}
            tx.add_rollout(
                rollout,
                [
                    NewMember(
                        host_id,
                        w,
                        by_id[host_id].agent_version,
                        SKIPPED if by_id[host_id].pinned_version else WAITING,
                        f"pinned to {by_id[host_id].pinned_version}" if by_id[host_id].pinned_version else None,
                    )
                    for host_id, w in plan
                ],
            )
            self._advance(tx, rollout.rollout_id, now)
        return self.show(rollout.rollout_id)

    def halt(self, reason: str, now: float) -> tuple[Rollout, list[Member]]:
        with self.storage.transaction() as tx:
            tx.lock(_LOCK)
            running = tx.running_rollouts()
            if not running:
                raise RolloutNotRunning("no rollout is running")
            self._halt(tx, running[0], reason, now)
        return self.show(running[0])

    def advance(self, now: float) -> list[str]:
        """One pass over the running rollouts: what changed, for the server's log."""
        with self.storage.reading() as tx:
            if not tx.running_rollouts():
                return []  # the usual case, and no write transaction for it
        changes: list[str] = []
        with self.storage.transaction() as tx:
            tx.lock(_LOCK)
            for rollout_id in tx.running_rollouts():
                changes += self._advance(tx, rollout_id, now)
        return changes

    def show(self, rollout_id: str) -> tuple[Rollout, list[Member]]:
        with self.storage.reading() as tx:
            return _load(tx, rollout_id), tx.members(rollout_id)

    def listing(self, limit: int = 20) -> list[tuple[Rollout, list[Member]]]:
        """The newest rollouts, each with its machines."""
        with self.storage.reading() as tx:
            return [(r, tx.members(r.rollout_id)) for r in tx.newest_rollouts(limit)]

    def newest(self, limit: int = 10) -> list[Rollout]:
        """The newest rollouts (by the rollouts_by_created index)."""
        with self.storage.reading() as tx:
            return tx.newest_rollouts(limit)

    def counts(self, rollout_ids: list[str]) -> dict[str, dict[str, int]]:
        """How many machines of each rollout are in each state, counted by the database over the rollouts' key (the
        dashboard and /metrics never load a big rollout's machines to count them; they count a finished rollout's
        once: its machines no longer move)."""
        if not rollout_ids:
            return {}
        with self.storage.reading() as tx:
            return tx.member_counts(rollout_ids)

    def page(
        self, rollout_id: str, *, states: tuple[str, ...] = (), offset: int = 0, limit: int = 100
    ) -> tuple[Rollout | None, int, list[Member], dict[str, int]]:
        """One page of a rollout's machines (in ``states``, if given), in wave and host-ID order, how many match, and
        how many are in each state: the dashboard shows a rollout of any size a page at a time."""
        with self.storage.reading() as tx:
            rollout = tx.rollout(rollout_id)
            if rollout is None:
                return None, 0, [], {}
            total, members = tx.members_page(rollout_id, states, offset, limit)
            counts = tx.member_counts([rollout_id])[rollout_id]
        return rollout, total, members, counts

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
                tx.pin(m.host_id, pinned, reason, job)
            return [tx.machine(h) or m for h, m in zip(host_ids, found, strict=True)]

    def unpin(self, host_ids: list[str]) -> list[Machine]:
        """The machines follow rollouts again (the next one that includes them)."""
        with self.storage.transaction() as tx:
            found = self._known(tx, host_ids)
            for m in found:
                tx.unpin(m.host_id)
            return [tx.machine(h) or m for h, m in zip(host_ids, found, strict=True)]

    # One pass -----------------------------------------------------------------------------------------------

    def _advance(self, tx: Tx, rollout_id: str, now: float) -> list[str]:
        changes: list[str] = []
        for _ in range(10_000):  # bounded: each turn opens a wave or ends the rollout
            rollout = _load(tx, rollout_id)
            if rollout.state != RUNNING:
                return changes
            for row in tx.members(rollout_id):
                if row.state == OFFERED and row.wave <= rollout.current_wave:
                    changes += self._settle(tx, rollout, row, now)
            rows = tx.members(rollout_id)
            failed = [r for r in rows if r.state == FAILED]
            if len(failed) >= rollout.max_failures:
                shown = "; ".join(
                    f"{r.hostname} ({r.host_id}): {r.error_id or r.job_error or 'failed'}" for r in failed
                )
                self._halt(tx, rollout_id, f"{len(failed)} failed (at most {rollout.max_failures}): {shown}", now)
                return [*changes, f"rollout {rollout_id} halted: {shown}"]
            if any(r.state == OFFERED for r in rows):
                return changes
            if rollout.current_wave >= rollout.waves:
                tx.set_rollout(rollout_id, now, state=COMPLETED)
                return [*changes, f"rollout {rollout_id} to {rollout.to_version} completed"]
            wave = rollout.current_wave + 1
            tx.set_rollout(rollout_id, now, current_wave=wave)
            for row in rows:
                if row.wave == wave and row.state == WAITING:
                    self._open(tx, rollout, row, now)
            changes.append(f"rollout {rollout_id}: wave {wave} of {rollout.waves} offered {rollout.to_version}")
        return changes

    def _open(self, tx: Tx, rollout: Rollout, row: Member, now: float) -> None:
        machine = tx.machine(row.host_id)
        rollout_id = rollout.rollout_id
        if machine is None:
            tx.set_member(rollout_id, row.host_id, SKIPPED, None, "the machine was removed", now)
        elif machine.pinned_version is not None:
            tx.set_member(rollout_id, row.host_id, SKIPPED, None, f"pinned to {machine.pinned_version}", now)
        elif machine.agent_version == rollout.to_version:
            tx.set_member(rollout_id, row.host_id, SUCCEEDED, None, f"already runs {rollout.to_version}", now)
        else:
            detail = f"offered {rollout.to_version} (rollout {rollout_id}, wave {row.wave} of {rollout.waves})"
            job = self._offer_job(tx, machine, rollout.to_version, detail, now)
            tx.set_target(machine.host_id, rollout.to_version, job)
            tx.offer_member(rollout_id, row.host_id, job, machine.agent_version, now)

    def _settle(self, tx: Tx, rollout: Rollout, row: Member, now: float) -> list[str]:
        """An offered member: ended (its job), verified on the new version, or out of time."""
        if row.job_state == "failed":
            error = row.job_error
            tx.set_member(rollout.rollout_id, row.host_id, FAILED, error, None, now)
            why = f"upgrade to {rollout.to_version} failed ({error or 'no error ID'}): pinned to {row.from_version}"
            # A machine whose upgrade failed stays at the version it ran before, until an operator unpins it.
            tx.pin_unpinned(row.host_id, row.job_id, row.from_version, why[:1000])
            return [f"{row.hostname} ({row.host_id}): {why}"]
        verified = (
            row.job_state in _SUCCEEDED
            and row.agent_version == rollout.to_version
            and row.online(now)
            and row.health != "critical"
        )
        if verified:
            tx.set_member(rollout.rollout_id, row.host_id, SUCCEEDED, None, None, now)
            return [f"{row.hostname} ({row.host_id}) runs {rollout.to_version}"]
        if row.offered_at is not None and now - row.offered_at > rollout.wave_timeout:
            where = f"its job {row.job_state}, it runs {row.agent_version}, health {row.health or 'unknown'}"
            timed_out = UpdateTimedOut(
                f"not verified on {rollout.to_version} within the wave timeout ({rollout.wave_timeout:.0f} s): {where}"
            )
            tx.set_member(rollout.rollout_id, row.host_id, FAILED, timed_out.code, timed_out.message, now)
            if row.job_state not in _SUCCEEDED:
                tx.fail_running_job(row.job_id, timed_out.code, timed_out.fix, timed_out.message, now)
            # A failed move like any other: pinned, with the reason, so that no later rollout offers the machine a
            # version before someone has looked. To the version its heartbeats say it runs (it may be the new one,
            # switched to and never verified: a version that does not replicate again is never committed), and
            # without a move: the server does not send a machine it knows nothing more of anywhere.
            runs = row.agent_version or row.from_version
            why = f"upgrade to {rollout.to_version} failed ({timed_out.code}, {where}): pinned to {runs}"
            tx.pin_unpinned(row.host_id, row.job_id, runs, why[:1000])
            return [f"{row.hostname} ({row.host_id}): {timed_out.message}; pinned to {runs}"]
        return []

    def _halt(self, tx: Tx, rollout_id: str, reason: str, now: float) -> None:
        halted = RolloutHalted(f"rollout {rollout_id} halted before this machine started its upgrade: {reason}")
        for row in tx.members(rollout_id):
            if row.state == OFFERED and not row.started:
                tx.set_member(rollout_id, row.host_id, WITHDRAWN, None, "the rollout halted before it started", now)
                tx.fail_running_job(row.job_id, halted.code, halted.fix, halted.message, now)
                tx.withdraw_target(row.host_id, row.job_id)
        tx.set_rollout(rollout_id, now, state=HALTED, reason=reason[:4000])

    # Rows -----------------------------------------------------------------------------------------------------

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
    tx.repin(host_id, job_id, pinned, reason[:1000])
    return f"{m.hostname} ({host_id}): {reason}"


def target_of(m: Machine | Credential) -> UpdateTarget | None:
    """What a heartbeat answer tells the machine: its target version (and job), or nothing."""
    if m.target_version is None:
        return None
    return UpdateTarget(m.target_version, m.target_job, m.pinned_version is not None)
