"""The health gate of a new agent version: pure. The watcher (agent/update/watcher.py, running the previous version's
program) feeds it what it sees of the machine once a second; the gate answers wait, commit or roll back.

What it holds against the new version, and what it never does (docs/updates.md; the references' failure modes). The
gate blames the agent only for the agent's faults: the server, the process server, the repository and the clock are
the environment, and never cause a rollback.

- **It does not start, or crashes in a loop**: ``crash_limit`` exits (or self-restarts) of the new version, or no
  daemon running at all for ``start_timeout``. A supervisor that cannot tell (``running`` None: systemd did not
  answer in time) is asked again; nothing is concluded from it.
- **It cannot reach the server while the previous one could**: only when the previous version's last heartbeats
  reached the server (the baseline) *and* the watcher itself reaches it now, continuously, for a grace of three
  heartbeats. With the server down nothing is held against the new version: the window stops counting until the
  watcher reaches the server again (a rollback must never fire for the server's own outage).
- **It reports CRITICAL**: only for a check that fails now and did not fail under the previous version, and that is
  the agent's own doing, in every report for two heartbeats. Which checks are the environment's (the server, the
  clock, the certificate, the disk, the freeze provider, replication) each health check declares itself
  (agent/daemon/health/self_checks.py); a check this program does not know is judged by what the new version's report
  declares. One bad sample never rolls back (Elastic Agent rolled back on a single 429).
- **It is not healthy within the window**: ``window`` seconds, counted only while the server is reachable.
- **Replication**, judged by progress, never by the process server's state: when the previous version's protected
  disks were all in CONTINUOUS at the switch, the new version is kept only once its own disks have been in CONTINUOUS,
  without an error, for ``replication_proof``. Until then it is not committed, and while that is all it lacks the
  window does not count: a stalled disk may be the process server's (down, its store full), which is never held
  against the new version (a version that never replicates again is never committed: the rollout's wave timeout
  reports it).

Time: every duration is measured on the watcher's monotonic clock (``Observation.at``); the daemon's own records
(when it started, its heartbeats) are compared only with each other and with the restart's wall-clock time, so a
clock step (an NTP correction, a resumed VM) neither shortens a window nor hides the new version's daemon.

It commits once the new version's daemon, started after the switch, has reached the server and reported healthy (or
warning, or critical only for what already failed before or is the environment's), and has stayed so, without
restarting, for ``settle``."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.daemon.health.self_checks import CHECK_TYPES
from agent.errors import UpdateCrashed, UpdateCritical, UpdateNotHealthy, UpdateRolledBack, UpdateUnreachable
from agent.update.state import Baseline

# Derived from the checks' own declarations, never spelled here: a check ID that is not one cannot exist.
KNOWN = frozenset(check.id for check in CHECK_TYPES)
ENVIRONMENT = frozenset(check.id for check in CHECK_TYPES if check.environment)
GOOD = frozenset({"healthy", "warning"})


@dataclass(frozen=True)
class GateSettings:
    window: float = 600.0  # to become healthy, counted while the server is reachable
    settle: float = 60.0  # healthy, without a restart, for this long before the upgrade commits
    heartbeat: float = 30.0  # the daemon's heartbeat interval
    crash_limit: int = 3
    # Its disks in CONTINUOUS without an error this long: the new version's streams did connect (a state inherited
    # from the previous version's clean stop reads CONTINUOUS at once; a connection that fails says so within 10 s,
    # agent/replication/stream.py CONNECT_TIMEOUT).
    replication_proof: float = 15.0

    @property
    def start_timeout(self) -> float:
        """How long no daemon may run at all after the restart (a supervisor restarts one within seconds)."""
        return min(self.window, 120.0)

    @property
    def critical_grace(self) -> float:
        return max(2 * self.heartbeat, 5.0)

    @property
    def unreachable_grace(self) -> float:
        return 3 * self.heartbeat + 10.0


@dataclass(frozen=True)
class Observation:
    """One look at the machine: what its supervisor says of the daemon process, what the daemon recorded of itself
    (daemon.json, replication's status), and whether the watcher reached the server (None: not probed this time).

    ``at`` is the watcher's monotonic clock: every duration is measured on it. The daemon's records are wall-clock
    times, compared only with each other and with the restart's recorded time."""

    at: float
    running: bool | None  # None: the supervisor could not tell this time
    exits: int  # daemon exits the supervisor saw since the restart into the new version
    version: str | None = None  # of the daemon's own record
    pid: int | None = None
    started: float | None = None
    last_heartbeat_ok: float | None = None
    heartbeats: int | None = None  # heartbeats the recorded daemon process got through to the server
    health: str | None = None  # healthy, warning, critical, unknown
    failing: frozenset[str] = frozenset()  # IDs of the checks that FAIL in its last report
    unknown: frozenset[str] = frozenset()  # and of those it could not run (UNKNOWN)
    environmental: frozenset[str] = frozenset()  # IDs its report declares the environment's
    report_time: float | None = None
    server_reachable: bool | None = None
    supervised_pid: int | None = None  # the daemon process the supervisor sees
    replicating: bool | None = None  # every protected disk in CONTINUOUS, without an error, as the new version says


@dataclass(frozen=True)
class Wait:
    why: str


@dataclass(frozen=True)
class Commit:
    why: str


@dataclass(frozen=True)
class RollBack:
    error: UpdateRolledBack


Verdict = Wait | Commit | RollBack


@dataclass
class HealthGate:
    settings: GateSettings
    baseline: Baseline
    to_version: str
    restarted_at: float  # when the watcher restarted the daemon into the new version (wall clock, as recorded)
    _begun: float | None = None  # this gate's first observation (monotonic): a watcher that took over begins then
    _last: float | None = None
    _counted: float = 0.0  # window time while the server was reachable
    _server_up: bool = True  # until a probe says otherwise: the baseline reached it moments ago
    _server_up_since: float | None = None
    _down_since: float | None = None  # no daemon running, since
    _ever_running: bool = False
    _starts: dict[tuple[int | None, float], float] = field(default_factory=dict)  # new version's starts: first seen
    _critical_since: float | None = None
    _critical_reports: set[float] = field(default_factory=set)
    _healthy_since: float | None = None
    _healthy_as: tuple[int | None, float | None] | None = None
    _replicating_since: float | None = None
    _replicated: bool = False  # the new version's disks have been in CONTINUOUS, without an error, long enough

    def observe(self, o: Observation) -> Verdict:
        s = self.settings
        begun = self._begun = self._begun if self._begun is not None else o.at
        elapsed = max(0.0, o.at - self._last) if self._last is not None else 0.0
        self._last = o.at
        if o.server_reachable is not None:
            if o.server_reachable and not self._server_up:
                self._server_up_since = o.at
            self._server_up = o.server_reachable
            if o.server_reachable and self._server_up_since is None:
                self._server_up_since = o.at

        ours = self._ours(o)
        start = (o.pid, o.started or 0.0)
        if ours:
            self._starts.setdefault(start, o.at)
        restarts = o.exits + max(0, len(self._starts) - 1)
        if restarts >= s.crash_limit:
            return RollBack(
                UpdateCrashed(
                    f"mobility {self.to_version} exited or restarted {restarts} times within "
                    f"{o.at - begun:.0f} s of its start"
                )
            )
        if o.running:
            self._ever_running, self._down_since = True, None
        elif o.running is False:
            self._down_since = self._down_since if self._down_since is not None else o.at
            down = o.at - max(self._down_since, begun) if self._ever_running else o.at - begun
            if down >= s.start_timeout:
                what = "stopped running" if self._ever_running else "did not start"
                return RollBack(UpdateCrashed(f"mobility {self.to_version} {what}: no daemon for {down:.0f} s"))

        environment = ENVIRONMENT | (o.environmental - KNOWN)
        own_failures = (o.failing - frozenset(self.baseline.failing) - environment) if ours else frozenset()
        if own_failures and o.running:
            if self._critical_since is None:
                self._critical_since, self._critical_reports = o.at, set()
            if o.report_time is not None:
                self._critical_reports.add(o.report_time)
            if o.at - self._critical_since >= s.critical_grace and len(self._critical_reports) >= 2:
                return RollBack(
                    UpdateCritical(
                        f"mobility {self.to_version} reports CRITICAL for {o.at - self._critical_since:.0f} s: "
                        f"{', '.join(sorted(own_failures))} failing (they passed under the previous version)"
                    )
                )
        elif o.running is not None:
            self._critical_since = None

        reached = ours and (
            o.heartbeats >= 1
            if o.heartbeats is not None
            else o.last_heartbeat_ok is not None and o.started is not None and o.last_heartbeat_ok >= o.started
        )
        if (
            self.baseline.reachable
            and ours
            and o.running
            and not reached
            and self._server_up
            and self._server_up_since is not None
        ):
            stuck = o.at - max(self._starts[start], self._server_up_since)
            if stuck >= s.unreachable_grace:
                return RollBack(
                    UpdateUnreachable(
                        f"mobility {self.to_version} has not reached the server in {stuck:.0f} s while the watcher "
                        "(the previous version's program) reaches it and the previous version did"
                    )
                )

        if ours and o.running and o.replicating:
            self._replicating_since = self._replicating_since if self._replicating_since is not None else o.at
            self._replicated = self._replicated or o.at - self._replicating_since >= s.replication_proof
        elif o.running is not None:
            self._replicating_since = None
        replication_owed = self.baseline.replicating and not self._replicated
        # Healthy, or not worse than the previous version was: what fails or cannot run now failed or could not run
        # before too, or is the environment's (a pre-existing full disk never holds an upgrade back).
        before = frozenset(self.baseline.failing) | frozenset(self.baseline.unknown) | environment
        healthy = bool(ours and o.running and reached and not own_failures and (o.health in GOOD or not (
            (o.failing | o.unknown) - before)))  # fmt: skip
        settled = False
        if healthy:
            who = (o.pid, o.started)
            if self._healthy_since is None or self._healthy_as != who:
                self._healthy_since, self._healthy_as = o.at, who
            settled = o.at - self._healthy_since >= s.settle
        else:
            self._healthy_since = None
        if self._server_up and o.running is not None and not (settled and replication_owed):
            self._counted += elapsed
        if settled and not replication_owed:
            return Commit(
                f"mobility {self.to_version} reached the server and reported {o.health} for "
                f"{o.at - (self._healthy_since or o.at):.0f} s"
            )
        if settled:  # all it lacks is replication's progress, which the process server may be holding up
            return Wait("healthy; its protected disks are not back in CONTINUOUS yet: the window waits for them")
        if healthy:
            return Wait(f"healthy for {o.at - (self._healthy_since or o.at):.0f} of {s.settle:.0f} s")

        if self._counted >= s.window:
            seen = o.health or "nothing"
            return RollBack(
                UpdateNotHealthy(
                    f"mobility {self.to_version} did not reach the server and report healthy within "
                    f"{s.window:.0f} s (last report: {seen})"
                )
            )
        if not self._server_up:
            return Wait("the server is unreachable from this machine: the window waits for it")
        if o.running is None:
            return Wait("the supervisor did not say whether the daemon runs: looking again")
        return Wait(f"{self._counted:.0f} of {s.window:.0f} s of the window")

    def _ours(self, o: Observation) -> bool:
        """Whether the daemon record is the new version's, started after the switch: by the restart's wall-clock
        time, or, whatever the clock did since, because the supervisor sees that very process running."""
        if o.version != self.to_version or o.started is None:
            return False
        seen = o.running is True and o.pid is not None and o.pid == o.supervised_pid
        return o.started >= self.restarted_at - 1.0 or seen
