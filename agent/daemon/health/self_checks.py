"""Health checks of the agent itself: pure functions of samples (what the shell measured) and the config.

Each check declares whether its failure can be the agent's own doing (``environment = False``: memory, CPU, threads
and files, the daemon) or says something about the machine and its surroundings (``environment = True``: the server,
the process server, the clock, the certificate, the disk, the freeze provider). The upgrade watcher's health gate
(agent/update/gate.py) takes its list of the environment's checks from these declarations: a new version is never
rolled back for the environment."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from agent.daemon.config import AgentConfig
from agent.lifecycle.check_report import Report, Result, Status
from agent.lifecycle.freeze import FreezeSetup
from agent.shared.errors import FreezeNotReady
from agent.shared.timefmt import shown

MIB = 1024 * 1024


class Health(IntEnum):
    """Overall health, as the monitoring-plugin convention numbers it (and `mobility health` exits)."""

    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def overall(report: Report) -> Health:
    statuses = {r.status for r in report.results}
    if Status.FAIL in statuses:
        return Health.CRITICAL
    if Status.WARN in statuses:
        return Health.WARNING
    if Status.UNKNOWN in statuses or not statuses:
        return Health.UNKNOWN
    return Health.HEALTHY


@dataclass(frozen=True)
class ProcessSample:
    """The daemon process, measured with psutil (None when the daemon is not running)."""

    rss_bytes: int
    cpu_percent: float
    threads: int
    open_files: int
    machine_memory_bytes: int


@dataclass(frozen=True)
class ServerSample:
    """What the last heartbeats said about the server."""

    last_ok: float | None = None
    unreachable_since: float | None = None
    rtt_ms: float | None = None
    skew_seconds: float | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class DiskSample:
    free_bytes: int  # the least free of the state and log directories' filesystems
    used_bytes: int  # size of the state and log directories


def _ok(id_: str, message: str, value: str, threshold: str) -> Result:
    return Result(id_, Status.PASS, message, value=value, threshold=threshold)


@dataclass(frozen=True)
class DaemonRunning:
    process: ProcessSample | None
    id: ClassVar[str] = "HLT-DAEMON"
    environment: ClassVar[bool] = False
    title: ClassVar[str] = "the daemon is running"
    remediation: ClassVar[str] = "Start it: systemctl start mobility (or /etc/init.d/mobility start); see agent.log."

    def run(self) -> Result:
        if self.process is None:
            return Result(self.id, Status.FAIL, "daemon not running", self.remediation)
        return Result(self.id, Status.PASS, "daemon running")


@dataclass(frozen=True)
class MemoryBudget:
    process: ProcessSample | None
    config: AgentConfig
    id: ClassVar[str] = "HLT-RSS"
    environment: ClassVar[bool] = False
    title: ClassVar[str] = "resident memory within the budget"
    remediation: ClassVar[str] = (
        "The daemon sheds caches at the warning level and restarts itself past the budget; if it stays high, "
        "collect `mobility diagnostics` and report it."
    )

    def run(self) -> Result:
        budget = self.config.memory_budget_mib
        threshold = f"{budget * self.config.memory_warn_ratio:.0f}/{budget:.0f} MiB"
        if self.process is None:
            return Result(self.id, Status.UNKNOWN, "daemon not running", self.remediation, threshold=threshold)
        mib = self.process.rss_bytes / MIB
        share = 100 * self.process.rss_bytes / max(self.process.machine_memory_bytes, 1)
        value = f"{mib:.1f} MiB"
        message = f"RSS {mib:.1f} MiB of a {budget:.0f} MiB budget ({share:.2f} % of the machine's memory)"
        if mib >= budget:
            return Result(self.id, Status.FAIL, message, self.remediation, value, threshold)
        if mib >= budget * self.config.memory_warn_ratio:
            return Result(self.id, Status.WARN, message, self.remediation, value, threshold)
        return _ok(self.id, message, value, threshold)


@dataclass(frozen=True)
class CpuUse:
    process: ProcessSample | None
    config: AgentConfig
    id: ClassVar[str] = "HLT-CPU"
    environment: ClassVar[bool] = False
    title: ClassVar[str] = "CPU use over the last window"
    remediation: ClassVar[str] = "Check agent.log for work in a loop; collect `mobility diagnostics` and report it."

    def run(self) -> Result:
        threshold = f"{self.config.cpu_warn_percent:.0f} %"
        if self.process is None:
            return Result(self.id, Status.UNKNOWN, "daemon not running", self.remediation, threshold=threshold)
        value = f"{self.process.cpu_percent:.1f} %"
        if self.process.cpu_percent > self.config.cpu_warn_percent:
            return Result(self.id, Status.WARN, f"CPU {value}", self.remediation, value, threshold)
        return _ok(self.id, f"CPU {value}", value, threshold)


@dataclass(frozen=True)
class ThreadsAndFiles:
    process: ProcessSample | None
    config: AgentConfig
    id: ClassVar[str] = "HLT-THREADS-FILES"
    environment: ClassVar[bool] = False
    title: ClassVar[str] = "threads and open files"
    remediation: ClassVar[str] = "A leak of threads or file handles: restart the daemon and report it with diagnostics."

    def run(self) -> Result:
        threshold = f"{self.config.threads_warn} threads, {self.config.open_files_warn} files"
        if self.process is None:
            return Result(self.id, Status.UNKNOWN, "daemon not running", self.remediation, threshold=threshold)
        p = self.process
        value = f"{p.threads} threads, {p.open_files} files"
        if p.threads > self.config.threads_warn or p.open_files > self.config.open_files_warn:
            return Result(self.id, Status.WARN, value, self.remediation, value, threshold)
        return _ok(self.id, value, value, threshold)


@dataclass(frozen=True)
class StateDisk:
    disk: DiskSample | None
    config: AgentConfig
    id: ClassVar[str] = "HLT-DISK"
    environment: ClassVar[bool] = True  # the filesystems' free space is the machine's
    title: ClassVar[str] = "free space and size of the state and log directories"
    remediation: ClassVar[str] = "Free space on the filesystems of /var/lib/mobility and /var/log/mobility."

    def run(self) -> Result:
        c = self.config
        threshold = f"free >= {c.disk_free_warn_mib:.0f} MiB, size <= {c.state_size_warn_mib:.0f} MiB"
        if self.disk is None:
            return Result(self.id, Status.UNKNOWN, "state directory missing", self.remediation, threshold=threshold)
        free, used = self.disk.free_bytes / MIB, self.disk.used_bytes / MIB
        value = f"{free:.0f} MiB free, {used:.1f} MiB used"
        if free < c.disk_free_fail_mib:
            return Result(self.id, Status.FAIL, value, self.remediation, value, threshold)
        if free < c.disk_free_warn_mib or used > c.state_size_warn_mib:
            return Result(self.id, Status.WARN, value, self.remediation, value, threshold)
        return _ok(self.id, value, value, threshold)


@dataclass(frozen=True)
class ServerReachable:
    server: ServerSample
    config: AgentConfig
    now: float
    id: ClassVar[str] = "HLT-SERVER"
    environment: ClassVar[bool] = True  # the server and the network path to it
    title: ClassVar[str] = "configuration server reachable"
    remediation: ClassVar[str] = "Check the network path and that `mobility-server serve` runs; reports are kept."

    def run(self) -> Result:
        s = self.server
        if s.unreachable_since is not None:
            since = self.now - s.unreachable_since
            status = Status.FAIL if since >= self.config.server_unreachable_fail_seconds else Status.WARN
            return Result(
                self.id,
                status,
                f"server unreachable since {shown(s.unreachable_since)} ({since:.0f} s): {s.last_error}",
                self.remediation,
                f"{since:.0f} s",
                f"{self.config.server_unreachable_fail_seconds:.0f} s",
            )
        if s.last_ok is None:
            return Result(self.id, Status.UNKNOWN, "no heartbeat yet", self.remediation)
        rtt = f"{s.rtt_ms:.1f} ms" if s.rtt_ms is not None else "?"
        return _ok(self.id, f"last heartbeat {shown(s.last_ok)}, round trip {rtt}", rtt, "reachable")


@dataclass(frozen=True)
class ClockSkew:
    server: ServerSample
    config: AgentConfig
    id: ClassVar[str] = "HLT-CLOCK-SKEW"
    environment: ClassVar[bool] = True  # the clock (an NTP step, a resumed VM)
    title: ClassVar[str] = "clock agrees with the server"
    remediation: ClassVar[str] = "Synchronise the clock (chrony or systemd-timesyncd): TLS and recovery points need it."

    def run(self) -> Result:
        c = self.config
        threshold = f"{c.clock_skew_warn_seconds:.0f}/{c.clock_skew_fail_seconds:.0f} s"
        if self.server.skew_seconds is None:
            return Result(self.id, Status.UNKNOWN, "no server time yet", self.remediation, threshold=threshold)
        skew = abs(self.server.skew_seconds)
        value = f"{self.server.skew_seconds:+.1f} s"
        status = (
            Status.FAIL
            if skew >= c.clock_skew_fail_seconds
            else Status.WARN
            if skew >= c.clock_skew_warn_seconds
            else Status.PASS
        )
        return Result(
            self.id,
            status,
            f"clock skew {value}",
            self.remediation if status is not Status.PASS else "",
            value,
            threshold,
        )


@dataclass(frozen=True)
class CertificateDays:
    not_after: float | None
    config: AgentConfig
    now: float
    id: ClassVar[str] = "HLT-CERT"
    environment: ClassVar[bool] = True  # the certificate's life and its renewal by the server
    title: ClassVar[str] = "client certificate valid"
    remediation: ClassVar[str] = "The daemon renews it after two thirds of its life; if not, run `mobility configure`."

    def run(self) -> Result:
        c = self.config
        threshold = f"{c.cert_warn_days:.0f}/{c.cert_fail_days:.0f} days"
        if self.not_after is None:
            return Result(
                self.id, Status.FAIL, "no client certificate: not registered", self.remediation, threshold=threshold
            )
        days = (self.not_after - self.now) / 86400
        value = f"{days:.1f} days"
        status = Status.FAIL if days < c.cert_fail_days else Status.WARN if days < c.cert_warn_days else Status.PASS
        message = f"certificate expires {shown(self.not_after)} ({value} left)"
        return Result(self.id, status, message, self.remediation if status is not Status.PASS else "", value, threshold)


@dataclass(frozen=True)
class FreezeProvider:
    setup: FreezeSetup  # agent.lifecycle.freeze.provider_status: the set-up's verdict, the one source of truth
    id: ClassVar[str] = "HLT-FREEZE"
    environment: ClassVar[bool] = True  # the freeze provider's set-up on this machine
    title: ClassVar[str] = "freeze provider set up"
    remediation: ClassVar[str] = FreezeNotReady.remediation

    def run(self) -> Result:
        if self.setup.ready:
            return Result(self.id, Status.PASS, f"freeze provider ready: {self.setup.reason}")
        return Result(
            self.id,
            Status.WARN,
            f"freeze provider not set up ({self.setup.reason}): only crash-consistent recovery points",
            self.remediation,
        )


@dataclass(frozen=True)
class Replication:
    """Protected disks: stalled ones are critical; syncing, paused, past the RPO or without a recent point warn."""

    status: dict[str, Any] | None  # what the replication engine reports (agent/replication/engine.py status_doc)
    now: float
    id: ClassVar[str] = "HLT-REPLICATION"
    # A stalled disk is most often the process server's doing (down, its store full): the health gate judges
    # replication by the new version's progress instead (agent/update/gate.py).
    environment: ClassVar[bool] = True
    title: ClassVar[str] = "protected disks replicating"
    remediation: ClassVar[str] = (
        "See `mobility status` for each disk's state and error (docs/replication.md lists what each means); a "
        "stalled disk needs the process server reachable and accepting data."
    )

    def run(self) -> Result:
        disks = (self.status or {}).get("disks") or []
        if not disks:
            return Result(self.id, Status.PASS, "no disk protected")
        stalled = [d for d in disks if d.get("state") == "STALLED"]
        if stalled:
            d = stalled[0]
            return Result(
                self.id,
                Status.FAIL,
                f"{d.get('disk')} is STALLED: {d.get('error')}: {d.get('detail')}",
                self.remediation,
            )
        waiting = [f"{d.get('disk')} {d.get('state')}" for d in disks if d.get("state") != "CONTINUOUS"]
        if waiting:
            return Result(self.id, Status.WARN, "not in CONTINUOUS: " + ", ".join(waiting), self.remediation)
        rpo = (self.status or {}).get("rpo_seconds")
        lag = max((d.get("lag_seconds") or 0.0) for d in disks)
        if isinstance(rpo, (int, float)) and lag > rpo:
            return Result(
                self.id,
                Status.WARN,
                f"lag {lag:.0f} s is past the RPO target of {rpo:.0f} s",
                self.remediation,
                f"{lag:.0f} s",
                f"{rpo:.0f} s",
            )
        interval = (self.status or {}).get("interval_seconds")
        last = (self.status or {}).get("last_point")
        started = (self.status or {}).get("started") or self.now
        newest = last if isinstance(last, (int, float)) else started
        if isinstance(interval, (int, float)) and self.now - newest > 2 * interval + 120:
            return Result(
                self.id, Status.WARN, f"no recovery point for {(self.now - newest) / 60:.0f} min", self.remediation
            )
        return Result(self.id, Status.PASS, f"{len(disks)} disks in CONTINUOUS, lag {lag:.1f} s", value=f"{lag:.1f} s")


HealthCheck = (
    DaemonRunning
    | MemoryBudget
    | CpuUse
    | ThreadsAndFiles
    | StateDisk
    | ServerReachable
    | ClockSkew
    | CertificateDays
    | FreezeProvider
    | Replication
)
# Every kind of health check the daemon runs, with its ID and whether its failure can be the environment's.
CHECK_TYPES: tuple[type[HealthCheck], ...] = (
    DaemonRunning,
    MemoryBudget,
    CpuUse,
    ThreadsAndFiles,
    StateDisk,
    ServerReachable,
    ClockSkew,
    CertificateDays,
    FreezeProvider,
    Replication,
)


def health_checks(
    config: AgentConfig,
    now: float,
    process: ProcessSample | None,
    server: ServerSample,
    disk: DiskSample | None,
    cert_not_after: float | None,
    freeze: FreezeSetup,
    replication: dict[str, Any] | None = None,
) -> list[HealthCheck]:
    """Every health check, in the order they are shown."""
    return [
        DaemonRunning(process),
        MemoryBudget(process, config),
        CpuUse(process, config),
        ThreadsAndFiles(process, config),
        StateDisk(disk, config),
        ServerReachable(server, config, now),
        ClockSkew(server, config),
        CertificateDays(cert_not_after, config, now),
        FreezeProvider(freeze),
        Replication(replication, now),
    ]
