"""The state of self-updates on a machine, on disk so that a power cut or a kill -9 at any step converges: the one
typed load and save of each file, and the locks (docs/updates.md).

- ``/var/lib/mobility/target.json``: the version the server last named for this machine in a heartbeat answer
  (written by the daemon; read by the updater and by the bootstrapper's at-boot check, which must not need the
  network).
- ``/var/lib/mobility/update.json``: the upgrade in progress, or the last one, with its phase. Every phase change is
  an atomic write made *before* the step it names, so a run that resumes redoes at most that step (each step is
  idempotent: agent/lifecycle/install.py's place and activate).
- ``/var/lib/mobility/upgrade.from``: present while an upgrade is unfinished; the version whose program watches it,
  as plain text for the SysV init script, which starts that watcher at boot.
- ``update.lock``: held by the one updater for its whole life (an flock: a killed updater releases it, so a new one
  never waits on a stale lock file, the failure mode Elastic Agent's watcher had). ``switch.lock``: shared by work
  the agent must not switch versions under, exclusive while a switch or a rollback restarts the daemon.

Both JSON files are input when read back (a damaged disk, an operator): every field is checked, and a record that is
not one reads as absent."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import UpdateBusy
from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, open_lock_file, read_small_file, remove

MAX_RECORD_BYTES = 64 * 1024
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+){1,7}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ERROR_ID = re.compile(r"[A-Z][A-Z0-9-]{0,63}")


def is_version(text: object) -> bool:
    return isinstance(text, str) and _VERSION.fullmatch(text) is not None


_LAST_LINE = " (its last line)"


def _speaker(version: str) -> str:
    return f"mobility {version} daemon "


def last_words(version: str, how: str) -> str:
    """The daemon's last log line before it stops or executes the version ``current`` names: where a version's lines
    end in agent.log and the journal, so that the job of a version rolled back quotes that version's words only."""
    return f"{_speaker(version)}{how}{_LAST_LINE}"


def after_last_words(lines: list[str], version: str) -> list[str]:
    """The lines after ``version``'s daemon's last words (all of them if it said none: it was killed, or it predates
    them)."""
    for i in range(len(lines) - 1, -1, -1):
        if _speaker(version) in lines[i] and lines[i].endswith(_LAST_LINE):
            return lines[i + 1 :]
    return lines


# The target the server names --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRecord:
    """What the server asked of this machine in its last heartbeat answer."""

    version: str
    job_id: str | None = None  # the server's upgrade job for this machine (None: nothing to do, e.g. a pin to itself)
    pinned: bool = False  # an operator's pin or a rollback's: the machine stays at ``version``
    received: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "job_id": self.job_id, "pinned": self.pinned, "received": self.received}


def load_target(paths: Paths) -> TargetRecord | None:
    doc = _load(paths.update_target)
    if doc is None or not is_version(doc.get("version")):
        return None
    job_id = doc.get("job_id")
    return TargetRecord(
        doc["version"],
        job_id if isinstance(job_id, str) and _UUID.fullmatch(job_id) else None,
        doc.get("pinned") is True,
        _number(doc.get("received")) or 0.0,
    )


def save_target(paths: Paths, target: TargetRecord | None) -> None:
    """Record the target (None: the server names none, so none is kept)."""
    if target is None:
        with contextlib.suppress(FileNotFoundError):
            paths.update_target.unlink()
        return
    atomic_write(paths.update_target, json.dumps(target.to_json(), indent=2).encode())


# The upgrade in progress ------------------------------------------------------------------------------------------


class Phase(StrEnum):
    """Where an upgrade is; each is recorded before the step it names."""

    FETCHING = "fetching"  # download (TUF) and place versions/<to> beside the running one
    SWITCHING = "switching"  # make versions/<to> current (link, units, agent.json)
    RESTARTING = "restarting"  # restart the daemon into the new version
    WATCHING = "watching"  # the health gate
    ROLLING_BACK = "rolling-back"  # back to versions/<from>, restart
    COMMITTED = "committed"  # the new version passed its gate
    ROLLED_BACK = "rolled-back"  # the previous version runs again; the outcome says why
    FAILED = "failed"  # stopped before the switch (nothing changed); the outcome says why

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED)

    @property
    def switched(self) -> bool:
        """Whether ``current`` may point at the new version in this phase."""
        return self in (Phase.SWITCHING, Phase.RESTARTING, Phase.WATCHING, Phase.ROLLING_BACK)


@dataclass(frozen=True)
class Baseline:
    """The previous version as the switch found it: the gate judges the new one against it."""

    reachable: bool = False  # its last heartbeat had reached the server recently
    failing: tuple[str, ...] = ()  # health checks already FAIL (not the new version's doing)
    unknown: tuple[str, ...] = ()  # and those that could not run (UNKNOWN)
    heartbeat_seconds: float = 30.0
    replicating: bool = False  # its protected disks were all in CONTINUOUS: the new version must get them there too

    def to_json(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "failing": list(self.failing),
            "unknown": list(self.unknown),
            "heartbeat_seconds": self.heartbeat_seconds,
            "replicating": self.replicating,
        }

    @classmethod
    def from_json(cls, doc: object) -> Baseline:
        if not isinstance(doc, dict):
            return cls()
        beat = _number(doc.get("heartbeat_seconds"))
        return cls(
            doc.get("reachable") is True,
            _ids(doc.get("failing")),
            _ids(doc.get("unknown")),
            beat if beat is not None and 0 < beat <= 86400 else 30.0,
            doc.get("replicating") is True,
        )


def _ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str) and _ERROR_ID.fullmatch(v))[:64]


@dataclass(frozen=True)
class Outcome:
    """Why an upgrade ended as it did (a job's error ID, remediation and detail)."""

    error_id: str | None
    message: str
    remediation: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"error_id": self.error_id, "message": self.message, "remediation": self.remediation}


@dataclass(frozen=True)
class UpgradeRecord:
    from_version: str
    to_version: str
    job_id: str
    phase: Phase
    started: float
    switched_at: float | None = None
    restarted_at: float | None = None
    baseline: Baseline = field(default_factory=Baseline)
    outcome: Outcome | None = None
    reported: bool = False  # the terminal outcome reached the server
    resumes: int = 0  # how many times an updater took over an unfinished upgrade (in any phase)
    interrupted: int = 0  # how many times the health gate itself was taken over (the watching phase only)

    def at(self, phase: Phase, **changes: Any) -> UpgradeRecord:
        return replace(self, phase=phase, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "from_version": self.from_version,
            "to_version": self.to_version,
            "job_id": self.job_id,
            "phase": self.phase.value,
            "started": self.started,
            "switched_at": self.switched_at,
            "restarted_at": self.restarted_at,
            "baseline": self.baseline.to_json(),
            "outcome": self.outcome.to_json() if self.outcome else None,
            "reported": self.reported,
            "resumes": self.resumes,
            "interrupted": self.interrupted,
        }


def load_record(paths: Paths) -> UpgradeRecord | None:
    doc = _load(paths.update_record)
    if doc is None:
        return None
    try:
        phase = Phase(str(doc.get("phase")))
    except ValueError:
        return None
    job_id = doc.get("job_id")
    if not (is_version(doc.get("from_version")) and is_version(doc.get("to_version"))):
        return None
    started = _number(doc.get("started"))
    if not (isinstance(job_id, str) and _UUID.fullmatch(job_id)) or started is None:
        return None
    outcome = doc.get("outcome")
    error_id = outcome.get("error_id") if isinstance(outcome, dict) else None
    return UpgradeRecord(
        doc["from_version"],
        doc["to_version"],
        job_id,
        phase,
        started,
        _number(doc.get("switched_at")),
        _number(doc.get("restarted_at")),
        Baseline.from_json(doc.get("baseline")),
        Outcome(
            error_id if isinstance(error_id, str) and _ERROR_ID.fullmatch(error_id) else None,
            str(outcome.get("message", ""))[:2000],
            str(outcome["remediation"])[:2000] if isinstance(outcome.get("remediation"), str) else None,
        )
        if isinstance(outcome, dict)
        else None,
        doc.get("reported") is True,
        _count(doc.get("resumes")),
        _count(doc.get("interrupted")),
    )


def save_record(paths: Paths, record: UpgradeRecord) -> None:
    """The record, then the marker for the SysV script (present exactly while an upgrade is unfinished)."""
    atomic_write(paths.update_record, json.dumps(record.to_json(), indent=2).encode())
    if record.phase.terminal:
        with contextlib.suppress(FileNotFoundError):
            paths.upgrade_marker.unlink()
    else:
        atomic_write(paths.upgrade_marker, f"{record.from_version}\n".encode())


def unfinished(record: UpgradeRecord | None) -> bool:
    """Whether an updater has work on ``record``: an unfinished upgrade, or an outcome the server has not heard."""
    return record is not None and (not record.phase.terminal or not record.reported)


def declined(record: UpgradeRecord | None, target: TargetRecord) -> bool:
    """Whether ``target`` is the attempt that ``record`` already ended without success: its version is not tried
    again for the same job (the server pins the machine; an operator starts a new job to try again)."""
    return (
        record is not None
        and record.phase in (Phase.ROLLED_BACK, Phase.FAILED)
        and record.to_version == target.version
        and record.job_id == target.job_id
    )


# Locks --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def update_lock(paths: Paths) -> Iterator[None]:
    """The one updater: UpdateBusy at once when another process holds it."""
    with _flock(paths.update_lock, fcntl.LOCK_EX, 0.0, "another upgrade or rollback is running"):
        yield


def updater_running(paths: Paths) -> bool:
    """Whether some process holds the update lock now (it is released the moment that process ends)."""
    try:
        with update_lock(paths):
            return False
    except UpdateBusy:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def version_switch(paths: Paths, wait: float) -> Iterator[None]:
    """Exclusive: no recovery point runs while the agent switches versions and restarts. Waits up to ``wait``
    seconds for those that run (UpdateBusy after that)."""
    with _flock(paths.switch_lock, fcntl.LOCK_EX, wait, "a recovery point is being cut"):
        yield


@contextlib.contextmanager
def version_hold(paths: Paths, wait: float = 0.0) -> Iterator[None]:
    """Shared: hold off upgrades and rollbacks while this runs. The hook replication's recovery points take (several
    may hold it at once); waits up to ``wait`` seconds while a switch is under way (UpdateBusy after that)."""
    with _flock(paths.switch_lock, fcntl.LOCK_SH, wait, "the agent is switching versions"):
        yield


@contextlib.contextmanager
def _flock(lock: Path, how: int, wait: float, held_by: str) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock_file(lock)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise UpdateBusy(f"{lock} is held: {held_by}") from e
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


# Files ------------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        _, data = read_small_file(path, MAX_RECORD_BYTES)
        doc = json.loads(data)
    except (OSError, NotSmallRegularFile, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _count(value: object) -> int:
    """A count from a JSON document (0 when it is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31 else 0


def _number(value: object) -> float | None:
    """A finite number from a JSON document, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def forget(paths: Paths) -> None:
    """Remove the update state (uninstall removes the whole state directory; this is for template-prep)."""
    for p in (paths.update_record, paths.update_target, paths.upgrade_marker):
        remove(p)
