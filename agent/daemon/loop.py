"""The mobility daemon (`mobility run`): jobs on a schedule, driven by `tick(now)`; signal handlers only queue.

Jobs: heartbeat with the latest health report (30 s, or what the server asks), health self-check (60 s),
certificate renewal once two thirds of its life have passed, and an hourly look at the repository for a newer
agent. While the server is unreachable the daemon keeps running, keeps a bounded backlog of reports and sends
it on reconnect. It watches its own memory: at the warning level it sheds what it can and slows optional work;
past the budget it reports CRITICAL and restarts itself cleanly (systemd's MemoryMax= is the hard stop)."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent import __version__
from agent.daemon.config import AgentConfig, load_config
from agent.daemon.health import Health, ServerSample, health_checks, overall
from agent.daemon.health.sample import cert_lifetime, cert_not_after, disk_sample, process_sample
from agent.daemon.scheduler import ClockScheduler
from agent.daemon.sdnotify import Notifier
from agent.daemon.status import DaemonStatus
from agent.faults import fault_point
from agent.host.paths import Paths
from agent.host.proc import host_environ
from agent.host.runtime import self_command
from agent.lifecycle.check_report import Status, run_checks
from agent.lifecycle.failover import detect as detect_failover
from agent.lifecycle.failover import speaks_as_source
from agent.lifecycle.freeze import provider_status
from agent.lifecycle.identity import collect_facts, load_registration
from agent.lifecycle.install_dir import parse_install_dir
from agent.lifecycle.installed import load_install_record
from agent.lifecycle.services import init_of, start_updater, updater_argv
from agent.shared import timefmt, wire
from agent.shared.errors import MobilityError
from agent.update.state import (
    Phase,
    TargetRecord,
    declined,
    last_words,
    load_record,
    load_target,
    save_target,
    unfinished,
    updater_running,
)

log = logging.getLogger("mobility.daemon")

# The longest a stop takes, from SIGTERM to exit (systemd/mobility.service's TimeoutStopSec covers it): the loop may
# be waiting on a heartbeat (LINK_TIMEOUT) or on a write to a filesystem a point froze (the point's watchdog thaws it
# at the latest), then replication stops (a point cancelled, the disks' threads ended, the tracing kept).
LINK_TIMEOUT = 4.0


def stop_seconds() -> float:
    from agent.replication.engine import STOP_SECONDS as REPLICATION
    from agent.replication.points import WATCHDOG_SECONDS

    return max(LINK_TIMEOUT, WATCHDOG_SECONDS) + REPLICATION + 1.0


SLOW_FACTOR = 4  # optional work runs this much less often while memory is tight
MIN_CPU_WINDOW = 2.0  # seconds; CPU time moves in 10 ms ticks
FIRST_CPU_WINDOW = 0.2  # seconds the first health check spends measuring CPU


class Link(Protocol):
    """The daemon's connection to the configuration server (mutual TLS in production)."""

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def renew(self) -> None: ...
    def newest_version(self, os_tag: str) -> str | None: ...
    def close(self) -> None: ...


class RestartRequested(Exception):
    """Raised out of tick() when the daemon must restart itself: memory past the budget (the same program), or
    SIGUSR1, the upgrade watcher's request to start again from ``current`` (where there is no init system)."""

    def __init__(self, why: str, *, into_current: bool = False) -> None:
        super().__init__(why)
        self.into_current = into_current


class Daemon:
    def __init__(
        self,
        paths: Paths,
        config: AgentConfig,
        link: Link,
        *,
        now: float,
        notifier: Notifier | None = None,
        process: psutil.Process | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.paths, self.config, self.link = paths, config, link
        self.notifier = notifier or Notifier(None)
        self.process = process or psutil.Process()
        self.wall = wall
        self.now = now
        reg = load_registration(paths)
        self.host_id = reg.host_id if reg else ""
        self.copy_of: str | None = None  # the host this machine is a copy of, while its registration is not its own
        # A recovery point of a protected machine, booted (agent/lifecycle/failover.py): told by the hypervisor or the
        # image.
        self.failover = detect_failover(paths, wall())
        self.heartbeat_seconds = reg.heartbeat_interval if reg else config.heartbeat_seconds
        self.status = DaemonStatus(
            pid=os.getpid(), started=now, version=__version__, heartbeat_seconds=self.heartbeat_seconds
        )
        self._updater_started: float | None = None  # when the daemon last started an upgrade watcher
        self.backlog: deque[dict[str, Any]] = deque(maxlen=config.backlog_max)
        self.signals: deque[int] = deque()
        self._update_thread: threading.Thread | None = None
        self._update_answers: deque[str | None] = deque(maxlen=1)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        self.ready = False
        self.shedding = False
        self.report: dict[str, Any] = {}
        self.replication: Any = None  # agent.replication.engine.Replication, once the server protects a disk
        self._tracing_checked = False
        self._cpu: float | None = None
        self._cpu_since = time.monotonic()
        self.metrics: Any = None
        if config.metrics_port is not None:
            from agent.daemon.metrics import Metrics  # loaded only when enabled: it costs memory

            self.metrics = Metrics(config.metrics_port)
        # The jobs run on the wall clock's advance, never on its steps back: a clock stepped back five minutes (an
        # NTP correction, a resumed VM) must not hold heartbeats up for five minutes (a step forward runs what is
        # due once, then the intervals go on from there).
        self._steady = now
        self.scheduler = ClockScheduler(lambda: dt.datetime.fromtimestamp(self._steady, dt.UTC).replace(tzinfo=None))
        self.process.cpu_percent(None)  # start the CPU window
        self._schedule()

    # Scheduling ---------------------------------------------------------------------------------------

    def _schedule(self) -> None:
        self.scheduler.clear()
        slow = SLOW_FACTOR if self.shedding else 1
        self.scheduler.every(self.heartbeat_seconds).seconds.do(self.heartbeat)
        self.scheduler.every(self.config.health_seconds).seconds.do(self.check_health)
        self.scheduler.every(3600).seconds.do(self.renew_if_due)
        self.scheduler.every(self.config.update_check_seconds * slow).seconds.do(self.check_update)

    def tick(self, now: float) -> None:
        """Advance to ``now``: handle queued signals, run what is due, pet the watchdog."""
        self._steady += max(0.0, now - self.now)
        self.now = now
        while self.signals:
            self._handle(self.signals.popleft())
        if self.stopping:
            return
        fault_point("daemon.tick")  # the memory-budget tests grow this process's memory here
        self._take_update_answer()
        _reap_children()
        self.scheduler.run_pending()
        if self.replication is not None:
            self.replication.tick(now)
        self.notifier.notify(watchdog="1")

    def queue_signal(self, signum: int, _frame: object = None) -> None:
        """The signal handler: only queue (the wakeup fd, set in run_forever, wakes the loop at once)."""
        self.signals.append(signum)

    def _handle(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("stopping on signal %d", signum)
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.config = load_config(self.paths)
            self.backlog = deque(self.backlog, maxlen=self.config.backlog_max)
            log.info("configuration reloaded")
            self._schedule()
        elif signum == signal.SIGUSR2 and self.replication is not None:
            self.replication.request_point()  # `mobility point` left a request
        elif signum == signal.SIGUSR1:
            log.info("asked to start again from the version `current` names")
            raise RestartRequested("SIGUSR1", into_current=True)

    # Jobs ------------------------------------------------------------------------------------------------

    def _cpu_percent(self, measure: bool) -> float | None:
        """The daemon's CPU use over a window of at least MIN_CPU_WINDOW: over a few milliseconds (the first check
        right after start, a re-check moments later) psutil's figure is noise of whole clock ticks, thousands of
        percent. The first figure is measured over a short blocking window instead; later ones since the last."""
        elapsed = time.monotonic() - self._cpu_since
        try:
            if self._cpu is None and elapsed < MIN_CPU_WINDOW:
                self._cpu = self.process.cpu_percent(interval=FIRST_CPU_WINDOW)
            elif measure and elapsed >= MIN_CPU_WINDOW:
                self._cpu = self.process.cpu_percent(None)
            else:
                return self._cpu
        except psutil.Error:
            return None
        self._cpu_since = time.monotonic()
        return self._cpu

    def check_health(self, measure_cpu: bool = True) -> dict[str, Any]:
        """``measure_cpu=False`` keeps the last CPU figure (a re-check moments later, with the server's answer)."""
        process = process_sample(self.process, self._cpu_percent(measure_cpu))
        server = ServerSample(
            self.status.last_heartbeat_ok,
            self.status.unreachable_since,
            self.status.rtt_ms,
            self.status.skew_seconds,
            self.status.last_error,
        )
        checks = health_checks(
            self.config,
            self.now,
            process,
            server,
            disk_sample(self.paths),
            cert_not_after(self.paths),
            provider_status(self.paths),
            self.replication.status_doc() if self.replication is not None else None,
        )
        report = run_checks(checks)
        health = overall(report)
        # Each check says whether its failure can be the environment's: an upgrade watcher of an older version, which
        # does not know a check this version added, judges it by this.
        results = [{**r.to_json(), "environment": c.environment} for c, r in zip(checks, report.results, strict=True)]
        self.report = {"status": health.label, "time": self.now, "checks": results}
        self.status.health = self.report
        summary = "; ".join(f"{r.id} {r.status.value}" for r in report.results if r.status is not Status.PASS)
        self.notifier.notify(status=f"{health.label}" + (f": {summary}" if summary else ""))
        if not self.ready:
            self.ready = True
            self.notifier.notify(ready="1")
        if self.metrics is not None:
            self.metrics.update(
                self.report, process.rss_bytes if process else 0, len(self.backlog), self.status.heartbeats_sent
            )
        rss = next(r for r in report.results if r.id == "HLT-RSS")
        if rss.status is Status.WARN and not self.shedding:
            self._shed(rss.message)
        elif rss.status is Status.PASS and self.shedding:
            self.shedding = False
            log.info("memory back under the warning level: optional work at its normal pace")
            self._schedule()
        self.status.save(self.paths)
        if rss.status is Status.FAIL:
            log.error("%s: past the budget, restarting cleanly", rss.message)
            self.heartbeat()  # the server hears CRITICAL before the restart
            raise RestartRequested(rss.message)
        return self.report

    def _shed(self, why: str) -> None:
        log.warning("%s: shedding caches and slowing optional work", why)
        self.shedding = True
        keep = max(1, len(self.backlog) // 2)
        while len(self.backlog) > keep:
            self.backlog.popleft()
        gc.collect()
        self._schedule()

    def registration_is_ours(self) -> bool:
        """Whether the registration on disk is this machine's: the same machine-id and DMI UUID (a replaced NIC is
        still the same machine, as the server judges it). A copy of a registered machine (a clone of a template that
        was not prepped, a disk restored on other hardware) holds that machine's identity and key, and must never
        speak as it: until the bootstrapper has registered the copy as itself (then it restarts this daemon), the
        daemon sends nothing, replicates nothing and starts no upgrade. So does a failover of a protected machine
        (agent/lifecycle/failover.py) with the source's registration: a test failover for its whole life, a real one
        until it has registered as itself."""
        reg = load_registration(self.paths)
        if reg is not None and speaks_as_source(self.failover, reg.host_id) and self.failover is not None:
            if self.copy_of != reg.host_id:
                why = (
                    "nothing of a test failover reaches the server"
                    if self.failover.test
                    else "until the bootstrapper registers it as a machine of its own"
                )
                log.warning(
                    "this machine is %s: not speaking as %s (no heartbeat, no replication, no renewal, no upgrade): %s",
                    self.failover.describe(),
                    reg.host_id,
                    why,
                )
                self.copy_of = reg.host_id
                self.status.last_error = f"{self.failover.describe()}: {why}"
                self.status.save(self.paths)
            return False
        if reg is None or reg.facts.same_machine(collect_facts(self.paths)):
            if self.copy_of is not None and reg is not None:  # registered as itself meanwhile
                log.info("registered as %s: speaking to the server again", reg.host_id)
                self.host_id = reg.host_id
                self.status.last_error = None
                self.link.close()  # the next call uses this machine's own certificate
            self.copy_of = None
            return True
        if self.copy_of != reg.host_id:
            log.warning(
                "this machine is a copy of %s (its machine-id or DMI UUID differ from that registration's): not "
                "speaking as that machine until the bootstrapper registers this one",
                reg.host_id,
            )
            self.copy_of = reg.host_id
            self.status.last_error = f"a copy of {reg.host_id}: waiting for the bootstrapper to register this machine"
            self.status.save(self.paths)
        return False

    def heartbeat(self) -> None:
        if not self.registration_is_ours():
            return
        if self.report and self._under_health_gate():
            self.check_health()  # a fresh report at every heartbeat for the upgrade watcher that judges this version
        report = self.report or self.check_health()
        body = {"host_id": self.host_id, "agent_version": __version__, "health": report}
        if self.replication is not None:
            body["replication"] = self.replication.report().to_json()
        start = time.perf_counter()
        try:
            answer = self.link.heartbeat(body)
        except MobilityError as e:
            if self.status.unreachable_since is None:
                self.status.unreachable_since = self.now
                log.warning("server unreachable since %s: %s: %s", timefmt.shown(self.now), e.id, e.message)
            self.status.last_error = f"{e.id}: {e.message}"
            self.backlog.append(body)
            self.status.backlog = len(self.backlog)
            self.status.save(self.paths)
            return
        self.status.rtt_ms = (time.perf_counter() - start) * 1000
        self.status.heartbeats_sent += 1
        self.status.last_heartbeat_ok = self.now
        if isinstance(answer.get("server_time"), (int, float)):
            self.status.skew_seconds = self.wall() - float(answer["server_time"])
        if self.status.unreachable_since is not None:
            log.info(
                "server reachable again after %.0f s; sending %d queued reports",
                self.now - self.status.unreachable_since,
                len(self.backlog),
            )
            self.status.unreachable_since = None
            self.status.last_error = None
            self._catch_up()
        if "protection" in answer:  # absent: this server does not say (an older one, or no process server known)
            self._protect(answer["protection"])
        interval = answer.get("interval")
        if isinstance(interval, (int, float)) and interval > 0 and interval != self.heartbeat_seconds:
            log.info("server asks for a heartbeat every %.0f s", interval)
            self.heartbeat_seconds = float(interval)
            self.status.heartbeat_seconds = self.heartbeat_seconds
            self._schedule()
        self._take_target(answer.get("update"))
        self.status.backlog = len(self.backlog)
        self.status.save(self.paths)

    def _protect(self, doc: Any) -> None:
        """The heartbeat answer's protection: start, retune or stop replication (agent/replication/)."""
        if doc is None and self.replication is None:
            if not self._tracing_checked:  # protection ended while the agent was down: end the tracing it left
                self._tracing_checked = True
                from agent.replication.state import forget_status, forget_tracing_stop
                from agent.replication.tracing import remove_leftover

                remove_leftover(self.paths.state_dir)
                forget_tracing_stop(self.paths)
                forget_status(self.paths)  # `mobility status` shows no disk as protected any more
            return
        from agent.shared.replication_wire import Protection
        from agent.shared.wire import WireError

        try:
            protection = Protection.from_json(doc) if doc is not None else None
        except WireError as e:
            log.warning("the server's protection settings are not valid (%s): replication left as it is", e)
            return
        if self.replication is None:
            from agent.lifecycle.registration import authenticated_client
            from agent.replication.engine import Replication
            from agent.shared.address import parse_address

            reg = load_registration(self.paths)
            if reg is None:
                return
            self.replication = Replication(
                self.paths,
                lambda: authenticated_client(self.paths)[1].context,
                parse_address(reg.server).host,
                trace_buffer_kb=self.config.replication_trace_buffer_kb,
                busy_share=self.config.replication_backoff_cpu_percent / 100,
            )
        self.replication.apply(protection)

    def _catch_up(self) -> None:
        while self.backlog:
            queued = self.backlog[0]
            try:
                self.link.heartbeat({**queued, "queued": True})
            except MobilityError:
                return  # unreachable again: the rest waits for the next success
            self.backlog.popleft()
            self.status.heartbeats_sent += 1

    def renew_if_due(self) -> None:
        if not self.registration_is_ours():
            return  # a renewal with another machine's certificate would supersede that machine's own
        life = cert_lifetime(self.paths)
        if life is None:
            return
        not_before, not_after = life
        if self.now < not_before + (not_after - not_before) * 2 / 3:
            return
        try:
            self.link.renew()
            log.info("client certificate renewed")
        except MobilityError as e:
            log.warning("certificate renewal failed (%s: %s); retrying within the hour", e.id, e.message)

    def _under_health_gate(self) -> bool:
        """Whether an upgrade watcher is judging this version now (it needs a report per heartbeat, not per health
        interval, to tell a lasting CRITICAL from one sample within two heartbeats)."""
        record = load_record(self.paths)
        return record is not None and record.phase is Phase.WATCHING and record.to_version == __version__

    def _take_target(self, field: object) -> None:
        """The version the server names for this machine: recorded (the bootstrapper reads it at boot, without the
        network) and, when it is another version than this one, handed to an upgrade watcher."""
        try:
            named = wire.UpdateTarget.from_json(field) if field is not None else None
        except wire.WireError as e:
            log.warning("ignoring the server's update answer: %s", e)
            return
        target = TargetRecord(named.version, named.job_id, named.pinned, self.now) if named is not None else None
        before = load_target(self.paths)
        if (before and (before.version, before.job_id, before.pinned)) != (
            target and (target.version, target.job_id, target.pinned)
        ):
            if target is not None:
                pin = " (pinned)" if target.pinned else ""
                log.info("the server names version %s for this machine%s (job %s)", target.version, pin, target.job_id)
            save_target(self.paths, target)
        self.start_upgrade_if_due(target)

    def start_upgrade_if_due(self, target: TargetRecord | None) -> None:
        """Start the upgrade watcher when there is an upgrade to make or one to finish, and none runs. The watcher
        is the program of the version the upgrade started from (this one, unless this is its new version)."""
        if self.copy_of is not None:
            return  # what the server named was for the machine this one is a copy of
        record = load_record(self.paths)
        wanted = target is not None and target.job_id is not None and target.version != __version__
        if not unfinished(record) and not (wanted and target is not None and not declined(record, target)):
            return
        now = self.now
        if self._updater_started is not None and 0 <= now - self._updater_started < max(
            10.0, 3 * self.heartbeat_seconds
        ):
            return
        if updater_running(self.paths):
            return
        installed = load_install_record(self.paths)
        if installed is None or not isinstance(installed.install_dir, str):
            return
        version = record.from_version if record is not None and unfinished(record) else __version__
        self._updater_started = now
        try:
            started = start_updater(self.paths, init_of(installed.os_tag), version, updater_argv(self.paths, version))
            log.info("upgrade watcher: %s", started)
        except MobilityError as e:
            log.warning("could not start the upgrade watcher: %s: %s", e.id, e.message)

    def check_update(self) -> None:
        """Ask for the newest version in a thread of its own: the repository's metadata may take minutes to arrive
        from a slow server, and the daemon's loop must keep heartbeating and petting the watchdog meanwhile (systemd
        kills a daemon that misses WatchdogSec). One check at a time; ``tick`` takes its answer."""
        installed = load_install_record(self.paths)
        os_tag = installed.os_tag if installed is not None else None
        if os_tag is None or (self._update_thread is not None and self._update_thread.is_alive()):
            return
        if self.copy_of is not None:
            return  # its client certificate is another machine's
        self._update_thread = threading.Thread(
            target=self._look_for_update, args=(os_tag,), name="update-check", daemon=True
        )
        self._update_thread.start()

    def _look_for_update(self, os_tag: str) -> None:
        try:
            self._update_answers.append(self.link.newest_version(os_tag))
        except MobilityError as e:
            log.info("update check failed: %s: %s", e.id, e.message)
        except Exception:
            log.exception("update check failed")
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"u")  # wake the loop to take the answer

    def _take_update_answer(self) -> None:
        if not self._update_answers:
            return
        newest = self._update_answers.popleft()
        from agent.lifecycle.bundles import version_key

        if newest is not None and version_key(newest) > version_key(__version__):
            if self.status.update_available != newest:
                log.info("update available: %s (running %s)", newest, __version__)
            self.status.update_available = newest
        else:
            self.status.update_available = None
        self.status.save(self.paths)

    # The loop --------------------------------------------------------------------------------------------

    def run_forever(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self.queue_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        log.info("mobility %s daemon started (pid %d, host %s)", __version__, os.getpid(), self.host_id or "-")
        try:
            self.now = time.time()
            self.check_health()
            self.heartbeat()
            first = self.report.get("status")
            self.now = time.time()
            self.check_health(measure_cpu=False)  # again, with the server's answer: reachability, round trip, skew
            if self.report.get("status") != first:
                self.heartbeat()  # so the server does not show the first report's UNKNOWN for a whole interval
            self.start_upgrade_if_due(load_target(self.paths))  # an upgrade a power cut or a kill left unfinished
            while not self.stopping:
                self.tick(time.time())
                wait = self.scheduler.seconds_to_next()
                ready, _, _ = select.select([self._wake_r], [], [], min(max(wait or 1.0, 0.05), 1.0))
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)
        except RestartRequested as e:
            self._close()
            log.info("%s", last_words(__version__, "starts again"))
            restart(into=self._current_launcher() if e.into_current else None)
        self.notifier.notify(stopping="1")
        self._close()
        log.info("%s", last_words(__version__, "stopped"))
        return 0

    def _current_launcher(self) -> Path | None:
        installed = load_install_record(self.paths)
        if installed is None or not isinstance(installed.install_dir, str):
            return None
        try:
            host = self.paths.install_dir(parse_install_dir(installed.install_dir, "the recorded install directory"))
        except MobilityError:
            return None
        launcher = host / "current" / "mobility" / "mobility"
        return launcher if launcher.is_file() else None

    def _close(self) -> None:
        if self.replication is not None:
            self.replication.stop()
        self.status.save(self.paths)
        self.link.close()
        if self.metrics is not None:
            self.metrics.close()


def restart(into: Path | None = None) -> None:
    """Replace this process with a fresh daemon: same PID, so systemd (or whoever started it) keeps supervising it.
    A frozen daemon starts again through its bundled loader, as its launcher started it, in the environment the
    launcher gave it; ``into``, the launcher of the version ``current`` names, starts that version instead (the
    launcher is a static program: it runs that version's own loader)."""
    logging.shutdown()
    argv = [str(into), *sys.argv[1:]] if into is not None else self_command(sys.argv[1:])
    os.execve(argv[0], argv, host_environ())  # noqa: S606 - our own program (or its next version), same arguments


def _reap_children() -> None:
    """Collect the exit of an upgrade watcher this daemon started (or an earlier image of it, before an exec)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


class ServerLink:
    """The real link: JSON over mutual TLS with the machine's certificate, one kept-alive connection."""

    def __init__(self, paths: Paths, timeout: float = LINK_TIMEOUT) -> None:
        self.paths = paths
        self.timeout = timeout  # short: a stop must never wait long on a dead server
        self._client: Any = None

    def _connect(self) -> Any:
        if self._client is None:
            from agent.lifecycle.registration import authenticated_client

            _, self._client = authenticated_client(self.paths, timeout=self.timeout)
        return self._client

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._connect().call("POST", wire.HEARTBEAT_PATH, body)
        return result

    def renew(self) -> None:
        from agent.lifecycle.registration import renew_certificate

        renew_certificate(self.paths)
        self.close()  # the next call uses the new certificate

    def newest_version(self, os_tag: str) -> str | None:
        """Runs in the update-check thread: its own client, never the heartbeat's connection."""
        from agent.lifecycle.fetch import newest_bundle
        from agent.lifecycle.registration import authenticated_client

        reg = load_registration(self.paths)
        if reg is None:
            return None
        _, client = authenticated_client(self.paths, timeout=self.timeout)
        client.close()  # only its TLS context is used: the fetcher opens its own connections
        name = newest_bundle(
            f"https://{reg.server}",
            client.context,
            (self.paths.tuf_dir / "root.json").read_bytes(),
            self.paths.tuf_metadata_dir,
            os_tag,
        )
        if name is None:
            return None
        from agent.lifecycle.bundles import parse_bundle_name

        return parse_bundle_name(name).version

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


__all__ = ["Daemon", "Health", "RestartRequested", "ServerLink", "restart"]
