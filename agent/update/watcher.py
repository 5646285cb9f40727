"""`mobility upgrade`: bring this machine to the version the server named for it, and keep it there only if that
version is healthy (docs/updates.md).

The updater is the watcher that does not live inside the new version: the daemon starts it as the program of the
version that runs now (systemd: the unit ``mobility-upgrade@<version>.service``, beside and not inside
``mobility.service``; otherwise a detached process), and it keeps running that program while it

1. fetches the bundle of the target version through TUF (``fetch``: never an unsigned, tampered or rolled-back
   one) and places it beside the running version (``beside``: versions/<v>, verified copy);
2. switches ``current`` to it atomically, with its units and agent.json (``switch``);
3. restarts the daemon into it (``daemonctl``: systemd, the SysV script, or the daemon itself with SIGUSR1);
4. watches it through the health gate (``gate``) and commits it, or switches ``current`` back to the previous
   version, restarts that, and reports why;
5. reports the upgrade job to the server at each step, and its end (the server pins a rolled-back machine).

Every step is recorded in /var/lib/mobility/update.json before it is taken (``state``), so an updater
that is killed, or a machine that loses power, resumes where it stopped: the daemon (of either version) starts an
updater again when it finds an unfinished record and none running; under systemd the unit restarts a killed updater
and is enabled for boot while an upgrade is unfinished; the SysV script starts one at boot. A temporary failure
before the switch (the server unreachable) leaves the record as it is for a later try; a full disk before the switch
ends the job failed with the running version untouched."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.daemon.config import load_config
from agent.daemon.status import DaemonStatus
from agent.errors import (
    AgentNotInstalled,
    InstallBusy,
    UpdateBusy,
    UpdateNotHealthy,
    UpdateRolledBack,
)
from agent.faults import fault_point
from agent.host.distros import BY_TAG, Init
from agent.host.paths import Paths
from agent.lifecycle.identity import load_registration, machine_hostname
from agent.lifecycle.install import install_lock, log, version_complete
from agent.lifecycle.install_dir import InstallDir, parse_install_dir
from agent.lifecycle.installed import InstallRecord, load_install_record
from agent.shared.errors import IoFailed, MobilityError, TemporaryError
from agent.shared.textsafe import printable
from agent.shared.wire import JobReport
from agent.update.beside import clean_staging, place_beside
from agent.update.daemonctl import Supervisor, supervisor_for
from agent.update.fetch import download_and_unpack
from agent.update.gate import Commit, GateSettings, HealthGate, Observation, RollBack
from agent.update.keeper import kept
from agent.update.state import (
    Baseline,
    Outcome,
    Phase,
    UpgradeRecord,
    after_last_words,
    declined,
    is_version,
    load_record,
    load_target,
    save_record,
    update_lock,
    version_switch,
)
from agent.update.switch import back_to, switch_to, want_watcher_at_boot

logger = logging.getLogger("mobility.updater")

LOCK_WAIT = 600.0  # seconds the updater waits for an install or a recovery point before it gives up for now
ROLLBACK_SWITCH_WAIT = 60.0  # a rollback waits at most this long for a recovery point, then goes ahead
MAX_INTERRUPTIONS = 5  # a health gate taken over this many times without an end rolls back
REPORT_FOR = 300.0  # seconds the updater keeps trying to report an outcome (the daemon starts it again later)
CONFIRM_FOR = 60.0  # seconds the updater waits to see the previous version run again after a rollback
OUTPUT_BUDGET = 900  # characters of the new version's own output in a rolled-back job's detail
LOG_BUDGET = 600  # characters of its agent.log lines there
LOG_LINES = 8  # at most this many of them


@dataclass(frozen=True)
class Result:
    state: str  # "nothing to do", "postponed", "committed", "rolled back", "failed"
    message: str
    record: UpgradeRecord | None = None


def upgrade(paths: Paths, *, sleep: Callable[[float], None] = time.sleep, again: Sequence[str] | None = None) -> Result:
    """Take the one update lock (UpdateBusy if another updater has it), then do or resume what there is to do.
    ``again`` starts this watcher again: where no systemd unit restarts a watcher that dies, a keeper process runs it
    if this one dies before its upgrade ends (agent/update/keeper.py)."""
    with update_lock(paths):
        updater = Updater(paths, sleep)
        if again is None or updater.supervisor.kind == "systemd":
            return updater.run()
        with kept(paths, again):
            return updater.run()


SERVER_GONE = "upgrade: the server is unreachable from this machine: the health window waits for it"
SERVER_BACK = "upgrade: the server answers again: the health window goes on"


class Updater:
    def __init__(self, paths: Paths, sleep: Callable[[float], None]) -> None:
        self.paths = paths
        self.sleep = sleep
        self.config = load_config(paths)
        installed = load_install_record(paths)
        if installed is None or not is_version(installed.version) or not isinstance(installed.install_dir, str):
            raise AgentNotInstalled("Mobility is not installed here (no valid install record): nothing to upgrade")
        self.installed: InstallRecord = installed
        self.install_dir: InstallDir = parse_install_dir(installed.install_dir, "the recorded install directory")
        self.host_dir = paths.install_dir(self.install_dir)
        tag = BY_TAG.get(installed.os_tag or "")
        self.init = tag.init if tag is not None else Init.SYSTEMD
        launcher = self.host_dir / "current" / "mobility" / "mobility"
        root_args = ["--root", str(paths.root)] if paths.root != paths.root.parent else []
        self.supervisor: Supervisor = supervisor_for(paths, self.init, [str(launcher), "run", *root_args])
        self._counting = False  # the supervisor counts the new version's exits since this run restarted it

    # The phases ------------------------------------------------------------------------------------------------

    def run(self, stop_before: Phase | None = None) -> Result:
        """Do (or resume) the upgrade; ``stop_before`` leaves it recorded at that phase for a later updater (the
        bootstrapper under --root stops before the switch: nothing may be restarted on the host)."""
        record = load_record(self.paths)
        if record is not None and record.phase.terminal and not record.reported:
            return self._report_end(record.at(record.phase, resumes=record.resumes + 1))
        if record is None or record.phase.terminal:
            started = self._start(record)
            if isinstance(started, Result):
                return started
            record = started
        else:
            if record.phase is Phase.FETCHING and not self._still_wanted(record):
                return self._withdrawn(record)
            # Only a takeover of the health gate itself counts against the new version: a download postponed for a
            # repository answering 503 ends the watcher before the switch, and is not the new version's doing.
            interrupted = record.interrupted + (record.phase is Phase.WATCHING)
            record = record.at(record.phase, resumes=record.resumes + 1, interrupted=interrupted)
            log(self.paths, f"upgrade {record.from_version} -> {record.to_version}: resumed in {record.phase.value}")
            save_record(self.paths, record)
        steps: dict[Phase, Callable[[UpgradeRecord], UpgradeRecord | Result]] = {
            Phase.FETCHING: self._fetch,
            Phase.SWITCHING: self._switch,
            Phase.RESTARTING: self._restart,
            Phase.WATCHING: self._watch,
            Phase.ROLLING_BACK: self._roll_back,
        }
        while not record.phase.terminal:
            if record.phase is stop_before:
                return Result("staged", f"mobility {record.to_version} is in place; the switch comes next", record)
            fault_point("update.step", step=record.phase.value)  # the crash tests kill the updater here
            done = steps[record.phase](record)
            if isinstance(done, Result):
                return done
            record = done
            save_record(self.paths, record)
        return self._report_end(record)

    def _start(self, last: UpgradeRecord | None) -> UpgradeRecord | Result:
        target = load_target(self.paths)
        running = self.installed.version or ""
        if target is None or target.job_id is None or target.version == running:
            return Result("nothing to do", f"mobility {running} is the version the server names for this machine")
        if declined(last, target):
            return Result(
                "nothing to do",
                f"mobility {target.version} was rolled back here for job {target.job_id}: not tried again",
                last,
            )
        record = UpgradeRecord(running, target.version, target.job_id, Phase.FETCHING, time.time())
        log(self.paths, f"upgrade {running} -> {target.version} (job {target.job_id})")
        save_record(self.paths, record)
        return record

    def _still_wanted(self, record: UpgradeRecord) -> bool:
        """Whether the server still names the move ``record`` makes (its last heartbeat answer, in target.json)."""
        target = load_target(self.paths)
        return target is not None and (target.version, target.job_id) == (record.to_version, record.job_id)

    def _withdrawn(self, record: UpgradeRecord) -> Result:
        """A move not switched to yet that the server no longer names (its rollout halted, or the machine was out of
        its wave's time and pinned) is dropped, not finished behind the server's back: nothing changed here, and the
        server already ended its job, so there is nothing to report."""
        message = f"the server no longer names {record.to_version} for this machine (job {record.job_id})"
        log(self.paths, f"upgrade {record.from_version} -> {record.to_version} dropped before the switch: {message}")
        save_record(self.paths, record.at(Phase.FAILED, outcome=Outcome(None, message), reported=True))
        return Result("nothing to do", f"mobility {record.from_version} runs on: {message}", record)

    def _fetch(self, record: UpgradeRecord) -> UpgradeRecord | Result:
        self._progress(record, f"downloading {record.to_version} (verified by the repository's signed metadata)")
        try:
            staging = download_and_unpack(self.paths, self.installed, record.to_version)
            fault_point("update.step", step="downloaded")
            with self._locked_install():
                place_beside(self.host_dir, staging, record.from_version, record.to_version, self.installed.os_tag)
            clean_staging(self.paths, staging)
        except TemporaryError as e:  # the server or a lock, not this version: the record stays for a later try
            log(self.paths, f"upgrade to {record.to_version} postponed: {e.id}: {e.message}")
            return Result("postponed", f"{e.id}: {e.message}", record)
        except (MobilityError, OSError) as e:
            error = e if isinstance(e, MobilityError) else IoFailed.from_os_error(e)
            log(self.paths, f"upgrade to {record.to_version} failed before the switch: {error.id}: {error.message}")
            return record.at(Phase.FAILED, outcome=Outcome(error.id, error.message, error.fix))
        return record.at(Phase.SWITCHING, baseline=self._baseline())

    def _switch(self, record: UpgradeRecord) -> UpgradeRecord | Result:
        if not version_complete(self.host_dir, record.to_version):  # removed since it was placed: fetch again
            return record.at(Phase.FETCHING)
        try:
            with version_switch(self.paths, LOCK_WAIT), self._locked_install():
                switch_to(self.paths, self.install_dir, record.to_version, record.from_version)
                fault_point("update.step", step="linked")
                self._boot_watcher(record, enable=True)
        except TemporaryError as e:
            log(self.paths, f"upgrade to {record.to_version} postponed before the switch: {e.id}: {e.message}")
            return Result("postponed", f"{e.id}: {e.message}", record)
        except (MobilityError, OSError) as e:
            error = e if isinstance(e, MobilityError) else IoFailed.from_os_error(e)
            log(self.paths, f"switching to {record.to_version} failed: {error.id}: {error.message}; staying")
            self._back_to(record.from_version)  # the daemon was not restarted: it still runs this version
            self._boot_watcher(record, enable=False)
            return record.at(Phase.FAILED, outcome=Outcome(error.id, error.message, error.fix))
        log(self.paths, f"upgrade: current -> versions/{record.to_version}")
        return record.at(Phase.RESTARTING, switched_at=time.time())

    def _restart(self, record: UpgradeRecord) -> UpgradeRecord | Result:
        try:
            # Never under a recovery point: the daemon stopping mid-freeze would leave its point half cut.
            with version_switch(self.paths, LOCK_WAIT):
                self.supervisor.mark()
                self._counting = True
                restarted = time.time()
                self.supervisor.restart()
        except UpdateBusy as e:
            log(self.paths, f"upgrade to {record.to_version} postponed before the restart: {e.id}: {e.message}")
            return Result("postponed", f"{e.id}: {e.message}", record)
        log(self.paths, f"upgrade: restarted the daemon into {record.to_version} ({self.supervisor.kind})")
        record = record.at(Phase.WATCHING, restarted_at=restarted)
        save_record(self.paths, record)
        settings = self._gate_settings(record)
        self._progress(record, f"switched to {record.to_version}; watching its health (window {settings.window:.0f} s)")
        return record

    def _watch(self, record: UpgradeRecord) -> UpgradeRecord:
        settings = self._gate_settings(record)
        if record.interrupted > MAX_INTERRUPTIONS:
            error = UpdateNotHealthy(
                f"the health gate of {record.to_version} was interrupted {record.interrupted} times"
            )
            return self._verdict(record, error)
        restarted = record.restarted_at if record.restarted_at is not None else time.time()
        gate = HealthGate(settings, record.baseline, record.to_version, restarted)
        if not self._counting:  # taken over: count from now
            self.supervisor.mark()
        next_probe, reachable, was_reachable = 0.0, None, True
        log(self.paths, f"upgrade: watching {record.to_version} (window {settings.window:.0f} s)")
        while True:
            now = time.monotonic()  # durations only: a clock step must neither shorten nor stretch the gate
            if now >= next_probe:
                reachable, next_probe = self._probe(), now + max(1.0, settings.heartbeat / 2)
                if reachable != was_reachable:  # the log says why a window takes longer than it is
                    log(self.paths, SERVER_BACK if reachable else SERVER_GONE)
                    was_reachable = reachable
            verdict = gate.observe(self._observe(now, reachable))
            reachable = None
            if isinstance(verdict, Commit):
                log(self.paths, f"upgrade: {verdict.why}: keeping {record.to_version}")
                self._boot_watcher(record, enable=False)
                return record.at(Phase.COMMITTED, outcome=Outcome(None, verdict.why))
            if isinstance(verdict, RollBack):
                return self._verdict(record, verdict.error)
            self.sleep(1.0)  # Wait

    def _verdict(self, record: UpgradeRecord, error: UpdateRolledBack) -> UpgradeRecord:
        log(self.paths, f"upgrade: rolling back {record.to_version}: {error.id}: {error.message}")
        detail = error.message + self._evidence(record)
        return record.at(Phase.ROLLING_BACK, outcome=Outcome(error.id, detail, error.fix))

    def _roll_back(self, record: UpgradeRecord) -> UpgradeRecord:
        started = time.monotonic()
        with contextlib.ExitStack() as held:  # no recovery point starts until the previous version runs again
            try:
                held.enter_context(version_switch(self.paths, ROLLBACK_SWITCH_WAIT))
            except UpdateBusy:  # a point that runs this long is cut again after the restart: go on
                log(self.paths, "rollback: a recovery point still runs; rolling back anyway")
            while True:
                try:
                    with self._locked_install():
                        self._back_to(record.from_version, strict=True)
                    break
                except (MobilityError, OSError) as e:  # a full disk, a lock: the way back is retried until it works
                    log(self.paths, f"rollback to {record.from_version} failed ({e}); retrying")
                    self.sleep(5.0)
            fault_point("update.step", step="relinked")
            self.supervisor.mark()
            self.supervisor.restart()
        self._boot_watcher(record, enable=False)
        running = self._confirm(record.from_version)
        log(
            self.paths,
            f"upgrade: rolled back to {record.from_version}"
            + (f", running again {time.monotonic() - started:.1f} s later" if running else " (not seen running yet)"),
        )
        return record.at(Phase.ROLLED_BACK)

    # Steps' helpers --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked_install(self) -> Iterator[None]:
        """The install lock (no install, uninstall or bootstrap meanwhile), waited for up to LOCK_WAIT."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                with install_lock(self.paths):
                    yield
                return
            except InstallBusy:
                if time.monotonic() >= deadline:
                    raise
                self.sleep(2.0)

    def _back_to(self, version: str, *, strict: bool = False) -> None:
        """Make ``version`` current again, with its units and record (the version rolled back from is removed)."""
        back_to(self.paths, self.install_dir, version, strict=strict)

    def _baseline(self) -> Baseline:
        """The running (previous) version as the switch finds it, from its own record."""
        status = DaemonStatus.load(self.paths)
        if status is None:
            return Baseline()
        beat = status.heartbeat_seconds or 30.0
        checks = status.health.get("checks", []) if isinstance(status.health, dict) else []
        return Baseline(
            reachable=status.last_heartbeat_ok is not None and time.time() - status.last_heartbeat_ok <= 3 * beat + 5,
            failing=tuple(_ids(checks, "FAIL")),
            unknown=tuple(_ids(checks, "UNKNOWN")),
            heartbeat_seconds=beat,
            replicating=self._replicating(since=None) is True,
        )

    def _gate_settings(self, record: UpgradeRecord) -> GateSettings:
        return GateSettings(
            window=self.config.update_window_seconds,
            settle=self.config.update_settle_seconds,
            heartbeat=record.baseline.heartbeat_seconds,
        )

    def _observe(self, now: float, reachable: bool | None) -> Observation:
        seen = self.supervisor.look()
        status = DaemonStatus.load(self.paths)
        health = status.health if status is not None and isinstance(status.health, dict) else {}
        checks = health.get("checks", [])
        report_time = health.get("time")
        return Observation(
            at=now,
            running=seen.running,
            exits=seen.exits,
            version=status.version if status else None,
            pid=status.pid if status else None,
            started=status.started if status else None,
            last_heartbeat_ok=status.last_heartbeat_ok if status else None,
            heartbeats=status.heartbeats_sent if status and isinstance(status.heartbeats_sent, int) else None,
            health=str(health.get("status")) if health.get("status") else None,
            failing=frozenset(_ids(checks, "FAIL")),
            unknown=frozenset(_ids(checks, "UNKNOWN")),
            environmental=frozenset(_declared_environment(checks)),
            report_time=float(report_time) if isinstance(report_time, (int, float)) else None,
            server_reachable=reachable,
            supervised_pid=seen.pid,
            replicating=self._replicating(since=status.started if status else None),
        )

    def _replicating(self, since: float | None) -> bool | None:
        """Whether every protected disk is in CONTINUOUS without an error in replication's status, as a daemon
        started at ``since`` (or any daemon, for None) wrote it; None when no disk is protected or there is no such
        status."""
        from agent.replication.state import load_status

        doc = load_status(self.paths)
        disks = doc.get("disks") if doc is not None else None
        updated = doc.get("updated") if doc is not None else None
        if not isinstance(disks, list) or not disks:
            return None
        if since is not None and not (isinstance(updated, (int, float)) and updated >= since):
            return None  # the previous daemon's last word, not this one's
        return all(isinstance(d, dict) and d.get("state") == "CONTINUOUS" and not d.get("error") for d in disks)

    def _probe(self) -> bool:
        """Whether this program (the previous version's) reaches the server now, with the machine's certificate."""
        from agent.lifecycle.registration import authenticated_client

        try:
            _, client = authenticated_client(self.paths, timeout=5.0)
        except MobilityError:
            return False
        try:
            client.call("GET", "/v1/health")
            return True
        except MobilityError:
            return False
        finally:
            client.close()

    def _confirm(self, version: str) -> bool:
        """Wait (bounded) until the daemon of ``version`` runs again: the benchmark's and the log's end point."""
        deadline = time.monotonic() + CONFIRM_FOR
        since = time.time() - 1
        while time.monotonic() < deadline:
            seen = self.supervisor.look()
            status = DaemonStatus.load(self.paths)
            if seen.running and status is not None and status.version == version and status.started >= since:
                return True
            self.sleep(0.5)
        return False

    def _boot_watcher(self, record: UpgradeRecord, *, enable: bool) -> None:
        """systemd: the updater's unit is wanted at boot exactly while an upgrade is unfinished, so that a power
        cut in the health window resumes it even if the new version cannot start."""
        if self.supervisor.kind != "systemd":
            return
        want_watcher_at_boot(self.paths, record.from_version, enable=enable)

    def _evidence(self, record: UpgradeRecord) -> str:
        """What the new version said before it was rolled back, for the job's detail: its own output (stdout and
        stderr: a crash at start says why only there) and the end of agent.log since the restart, each bounded
        (OUTPUT_BUDGET and LOG_BUDGET characters), with secrets redacted and control characters escaped. Only the
        new version's words: what the previous daemon logged up to its last words (it stops, or executes the new
        version, after the restart began) is left out."""
        from agent.daemon.diagnostics import known_secrets

        since = record.restarted_at or record.switched_at or record.started
        secrets = known_secrets(self.paths)
        where = {"systemd": "the journal of mobility.service", "none": "/var/log/mobility/daemon.out"}
        parts = []
        output = after_last_words(self.supervisor.output(since), record.from_version)
        if output:
            source = where.get(self.supervisor.kind, "its output")
            shown = _bounded(output, OUTPUT_BUDGET, secrets)
            parts.append(f"--- mobility {record.to_version} printed ({source}):\n{shown}")
        logged = after_last_words(_log_since(self.paths.agent_log, since), record.from_version)[-LOG_LINES:]
        if logged:
            parts.append(f"--- the end of /var/log/mobility/agent.log:\n{_bounded(logged, LOG_BUDGET, secrets)}")
        return "".join("\n" + part for part in parts)

    # Reports ---------------------------------------------------------------------------------------------------

    def _progress(self, record: UpgradeRecord, detail: str) -> None:
        """The job as running, with where it is: once, never holding the upgrade up for a server that is down."""
        self._send(record, "running", detail, None, None)

    def _report_end(self, record: UpgradeRecord) -> Result:
        outcome = record.outcome or Outcome(None, "")
        if record.phase is Phase.COMMITTED:
            state, result = "succeeded", "committed"
            detail = f"mobility {record.to_version} (from {record.from_version}): {outcome.message}"
        elif record.phase is Phase.ROLLED_BACK:
            state, result = "failed", "rolled back"
            detail = f"rolled back from {record.to_version} to {record.from_version}: {outcome.message}"
        else:
            state, result = "failed", "failed"
            detail = f"mobility {record.to_version} was not installed; {record.from_version} runs on: {outcome.message}"
        deadline = time.monotonic() + REPORT_FOR
        delay = 1.0
        fault_point("update.step", step="reporting")
        while not record.reported:
            runs = record.to_version if record.phase is Phase.COMMITTED else record.from_version
            if self._send(record, state, detail, outcome.error_id, outcome.remediation, runs):
                record = record.at(record.phase, reported=True)
                save_record(self.paths, record)
                break
            if time.monotonic() >= deadline:
                log(self.paths, f"upgrade job {record.job_id} not reported yet: the daemon will try again")
                break
            self.sleep(delay)
            delay = min(delay * 2, 30.0)
        return Result(result, detail, record)

    def _send(
        self,
        record: UpgradeRecord,
        state: str,
        detail: str,
        error_id: str | None,
        fix: str | None,
        runs: str | None = None,
    ) -> bool:
        from agent.lifecycle.registration import report_job

        reg = load_registration(self.paths)
        job = JobReport(
            kind="upgrade",
            state=state,
            hostname=machine_hostname(self.paths),
            job_id=record.job_id,
            host_id=reg.host_id if reg else None,
            error_id=error_id,
            remediation=fix[:2000] if fix else None,
            detail=detail[:4000],
            runs=runs,
        )
        try:
            report_job(self.paths, job.to_json(), None, "", None)
            return True
        except MobilityError as e:
            logger.info("could not report upgrade job %s: %s: %s", record.job_id, e.id, e.message)
            return False


def _ids(checks: object, status: str) -> list[str]:
    if not isinstance(checks, list):
        return []
    return [str(c["id"]) for c in checks if isinstance(c, dict) and c.get("status") == status and c.get("id")]


_KEY_TAIL = re.compile(r"\A.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_KEY_HEAD = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*\Z", re.S)


def _redacted(lines: list[str], secrets: list[str]) -> list[str]:
    """``lines`` redacted as one text (a private key spans lines), including a key the tail shows only part of: its
    end without its beginning (the lines before it are the key's), or its beginning without its end."""
    from agent.daemon.diagnostics import REDACTED, redact

    text = redact("\n".join(lines), secrets)
    text = _KEY_HEAD.sub(REDACTED, _KEY_TAIL.sub(REDACTED, text))
    return text.split("\n")


def _bounded(lines: list[str], budget: int, secrets: list[str]) -> str:
    """The last of ``lines`` that fit in ``budget`` characters: redacted, escaped, each cut to a screen's width."""
    kept: list[str] = []
    used = 0
    for line in reversed(_redacted(lines, secrets)):
        shown = printable(line, 240)
        if used + len(shown) + 1 > budget:
            break
        kept.append(shown)
        used += len(shown) + 1
    return "\n".join(reversed(kept))


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def _log_since(log_file: Path, since: float, lines: int = 64) -> list[str]:
    """The last ``lines`` lines of the daemon's log written at ``since`` or later (by their timestamps, local time
    as the log writes them; a line without one, such as a traceback's, goes with the line before it)."""
    try:
        fd = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 16384))
        text = f.read(16384).decode("utf-8", "replace")
    kept: list[str] = []
    recent = False
    for line in text.splitlines()[1:]:  # the first may be cut
        m = _LOG_TIME.match(line)
        if m:
            try:
                recent = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) >= since - 1
            except (ValueError, OverflowError):
                recent = False
        if recent and line.strip():
            kept.append(line)
    return kept[-lines:]


def _declared_environment(checks: object) -> list[str]:
    """The checks a report declares the environment's (a newer version's checks this program does not know)."""
    if not isinstance(checks, list):
        return []
    return [str(c["id"]) for c in checks if isinstance(c, dict) and c.get("environment") is True and c.get("id")]


__all__ = ["Result", "Updater", "upgrade"]
