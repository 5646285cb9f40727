"""What a freeze leaves behind: the record of the filesystems a point freezes (``/run/mobility/frozen.json``, this
module is its one owner), written and fsynced before the first FIFREEZE and removed after the thaw, and the thaw of
whatever it names.

FIFREEZE outlives the process that made it: a daemon killed inside a freeze (SIGKILL at the unit's stop timeout, the
OOM killer at MemoryMax) would leave the filesystems frozen, and every writer on them, the next daemon's first log
line included, blocked until someone thaws them. The record lets another process do it: every daemon start (before
it writes anything) and the unit's ExecStopPost (`mobility thaw`, run after the daemon ended, however it ended).
/run is emptied at boot, as freezes are. While the process that froze is alive (another daemon started by hand, an
operator's `mobility thaw` in the middle of a point), nothing is thawed: the point's own thaw and its watchdog do it
within seconds, and a thaw from outside would let writes into the point's freeze window. The record names that
process by PID and start time, so a PID used again by another program is not taken for it.

Thawing writes nothing before the filesystems are thawed (the record's removal afterwards is in /run, never on a
frozen filesystem), logs nothing (its caller logs once it is done), and never waits past its timeout: each
filesystem is thawed in a thread of its own. A mount point whose filesystem is no longer the one recorded (unmounted,
another mounted there) is left alone."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.host.paths import Paths
from agent.replication.devices import FITHAW
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

MAX_RECORD = 1 << 20
MAX_MOUNTS = 4096
PID_MAX = 1 << 22  # the kernel's largest pid_max
THAW_SECONDS = 5.0  # how long `mobility thaw` and a daemon start wait for every thaw


@dataclass(frozen=True)
class FrozenMount:
    path: str  # the mount point, as the kernel's mountinfo names it
    dev: int  # st_dev of the filesystem there when it was frozen


@dataclass(frozen=True)
class Record:
    mounts: list[FrozenMount]
    pid: int = 0
    started: int = 0  # the process's start time (clock ticks after boot, /proc/PID/stat field 22)


@dataclass
class ThawReport:
    thawed: list[str] = field(default_factory=list)  # were frozen, thawed here
    not_frozen: list[str] = field(default_factory=list)  # already thawed (the freezer got to it, or no freeze yet)
    skipped: list[str] = field(default_factory=list)  # not the recorded filesystem any more: left alone
    failed: list[str] = field(default_factory=list)  # why each thaw failed (the record stays for the next try)
    recorded: bool = False  # a record was there
    owner_alive: bool = False  # the process that froze still runs: left to it

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def record_frozen(paths: Paths, mount_points: Sequence[str]) -> None:
    """Before any FIFREEZE: the filesystems about to be frozen, durable (fsynced file and directory). A stat of a
    mount point never blocks on a frozen filesystem; /run is a tmpfs of its own."""
    mounts = [{"path": p, "dev": os.stat(p).st_dev} for p in mount_points]
    pid = os.getpid()
    doc = {"pid": pid, "started": _start_time(pid), "frozen_at": time.time(), "mounts": mounts}
    paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(paths.freeze_record, json.dumps(doc).encode(), 0o600)


def forget_frozen(paths: Paths) -> None:
    """After the thaw."""
    with contextlib.suppress(OSError):
        paths.freeze_record.unlink(missing_ok=True)


def _start_time(pid: int) -> int:
    """When ``pid`` started (0 if it does not run or is a zombie: dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return 0 if fields[:1] == [b"Z"] or len(fields) < 20 else int(fields[19])


def _owner_alive(record: Record) -> bool:
    """The process that froze still runs (not this one: a daemon that executed itself again keeps its PID)."""
    return record.pid > 0 and record.pid != os.getpid() and _start_time(record.pid) == record.started != 0


def load_frozen(paths: Paths) -> Record | None:
    """The record; None when there is none. A record that cannot be read whole names nothing (it is never
    half-written: ``atomic_write``)."""
    try:
        _, raw = read_small_file(paths.freeze_record, MAX_RECORD)
    except FileNotFoundError:
        return None
    except (OSError, NotSmallRegularFile):
        return Record([])
    try:
        doc = json.loads(raw)
        entries = doc["mounts"] if isinstance(doc, dict) else None
    except (ValueError, KeyError, RecursionError):
        return Record([])
    if not isinstance(entries, list):
        return Record([])
    pid, started = doc.get("pid"), doc.get("started")
    if not (isinstance(pid, int) and 0 < pid <= PID_MAX and isinstance(started, int) and 0 < started < 1 << 62):
        pid = started = 0  # no owner known: the filesystems are thawed
    found = []
    for entry in entries[:MAX_MOUNTS]:
        if not isinstance(entry, dict):
            continue
        path, dev = entry.get("path"), entry.get("dev")
        if not isinstance(path, str) or not isinstance(dev, int) or isinstance(dev, bool):
            continue
        if path.startswith("/") and len(path) <= 4096 and "\0" not in path and 0 <= dev < 1 << 64:
            found.append(FrozenMount(path, dev))
    return Record(found, pid, started)


def _thaw_one(mount: FrozenMount, report: ThawReport, lock: threading.Lock) -> None:
    try:
        fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        outcome, detail = "skipped", f"{mount.path}: {e.strerror}"
    else:
        try:
            if os.fstat(fd).st_dev != mount.dev:
                outcome, detail = "skipped", mount.path
            else:
                fcntl.ioctl(fd, FITHAW, 0)
                outcome, detail = "thawed", mount.path
        except OSError as e:
            if e.errno == errno.EINVAL:  # not frozen
                outcome, detail = "not_frozen", mount.path
            else:
                outcome, detail = "failed", f"{mount.path}: {e.strerror or e}"
        finally:
            os.close(fd)
    with lock:
        getattr(report, outcome).append(detail)


def thaw_recorded(paths: Paths, timeout: float = THAW_SECONDS) -> ThawReport:
    """Thaw every filesystem of the record, all at once, waiting at most ``timeout``; the record goes once each one
    was thawed or found not frozen (ThawReport.failed says what was not). Nothing is done while the process that
    froze them runs (``owner_alive``)."""
    record = load_frozen(paths)
    report = ThawReport(recorded=record is not None)
    if record is None:
        return report
    if _owner_alive(record):
        report.owner_alive = True
        return report
    mounts = record.mounts
    if not mounts:
        forget_frozen(paths)
        return report
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_thaw_one, args=(m, report, lock), name=f"thaw {m.path}", daemon=True) for m in mounts
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for m, t in zip(mounts, threads, strict=True):
            if t.is_alive():
                report.failed.append(f"{m.path}: no answer within {timeout:.0f} s")
        if not report.failed:
            forget_frozen(paths)
        return ThawReport(
            list(report.thawed),
            list(report.not_frozen),
            list(report.skipped),
            list(report.failed),
            report.recorded,
        )
