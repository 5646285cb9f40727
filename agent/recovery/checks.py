"""`mobility recovery-check`: the checks that prove a failed-over copy of this machine works, run inside that copy.

Two kinds, one report:

- built-in checks (`BUILTINS`: PostgreSQL), each of which decides whether it applies here (`skipped` when not);
- the machine's own executables in /etc/mobility/recovery.d/, run in name order as run-parts would (names of
  letters, digits, ``_`` and ``-`` only: editor backups and package leftovers are not run), as root, stdin from
  /dev/null, in a session of their own, with the failover in their environment (``MOBILITY_FAILOVER_KIND``,
  ``MOBILITY_FAILOVER_POINT``, ``MOBILITY_FAILOVER_SOURCE``) and their time budget (``MOBILITY_CHECK_TIMEOUT``).
  Exit 0 is `passed`, anything else `failed`; one that outlives its budget is killed with what it started, and has
  failed. An executable named like a built-in check replaces it (an operator's own PostgreSQL check, say).

Each check's output is kept to its last ``OUTPUT_TAIL`` bytes (stdout and stderr together, through a file: a
chatty check costs no memory). Nothing here decides for the checks: a check that cannot run has failed, never
passed."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from agent.errors import CommandFailed
from agent.failover import Failover
from agent.paths import Paths
from agent.proc import run

log = logging.getLogger("mobility.recovery")

OUTPUT_TAIL = 8 * 1024
DEFAULT_TIMEOUT = 600.0  # seconds per check: a database's WAL replay and a full consistency check take minutes
_RUN_PARTS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # a built-in check that does not apply here (no PostgreSQL on this machine)


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: its name, where it came from (``built-in`` or the executable's path), a one-line
    summary, how long it ran and the end of what it said."""

    name: str
    origin: str
    outcome: Outcome
    summary: str
    seconds: float
    output: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "origin": self.origin,
            "outcome": self.outcome.value,
            "summary": self.summary,
            "seconds": round(self.seconds, 1),
            "output": self.output,
        }


class BuiltinCheck(Protocol):
    """A check that ships with the agent: it decides whether it applies (SKIPPED when not) and keeps to ``timeout``."""

    @property
    def name(self) -> str: ...

    def run(self, paths: Paths, timeout: float) -> CheckResult: ...


@dataclass(frozen=True)
class RecoveryReport:
    results: tuple[CheckResult, ...]
    failover: Failover | None
    started: float
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.outcome is Outcome.FAILED]

    def to_json(self) -> dict[str, object]:
        return {
            "ok": not self.failed,
            "failover": self.failover.to_json() if self.failover is not None else None,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "checks": [r.to_json() for r in self.results],
        }


def executables(paths: Paths) -> list[Path]:
    """The machine's own checks: executable regular files of recovery.d with run-parts names, in name order."""
    try:
        entries = sorted(paths.recovery_dir.iterdir())
    except OSError:
        return []
    return [p for p in entries if _RUN_PARTS_NAME.fullmatch(p.name) and p.is_file() and _executable(p)]


def _executable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o111)
    except OSError:
        return False


def check_environment(failover: Failover | None, timeout: float) -> dict[str, str]:
    """What an executable check learns about the failover it runs in (pure)."""
    env = {"MOBILITY_CHECK_TIMEOUT": f"{timeout:.0f}"}
    if failover is not None:
        env["MOBILITY_FAILOVER_KIND"] = failover.kind
        env["MOBILITY_FAILOVER_POINT"] = failover.point_id
        env["MOBILITY_FAILOVER_SOURCE"] = failover.source_host or ""
    return env


def tail(data: bytes, limit: int = OUTPUT_TAIL) -> str:
    """The last ``limit`` bytes of ``data`` as text, starting at a line when one starts within them (pure)."""
    if len(data) > limit:
        data = data[-limit:]
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            data = data[cut + 1 :]
    return data.decode("utf-8", "replace")


def summary_of(output: str, fallback: str) -> str:
    """The last non-empty line a check printed (bounded), else ``fallback`` (pure)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else fallback


def run_executable(path: Path, origin: str, timeout: float, env: dict[str, str]) -> CheckResult:
    """``path`` run with ``env`` for at most ``timeout``; ``origin``: its path as the machine names it."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            done = run([str(path)], timeout=timeout, check=False, env=env, output=out)
            code: int | None = done.returncode
            why = ""
        except CommandFailed as e:
            code, why = None, e.message
        seconds = time.monotonic() - start
        out.seek(0, 2)
        size = out.tell()
        out.seek(max(0, size - OUTPUT_TAIL - 256))
        output = tail(out.read())
    if code == 0:
        return CheckResult(path.name, origin, Outcome.PASSED, summary_of(output, "exit 0"), seconds, output)
    if code is None:
        late = seconds >= timeout - 0.5
        reason = f"killed after {timeout:.0f} s (its time budget)" if late else why
        return CheckResult(path.name, origin, Outcome.FAILED, reason, seconds, output)
    return CheckResult(
        path.name, origin, Outcome.FAILED, f"exit {code}: {summary_of(output, 'no output')}", seconds, output
    )


def run_recovery_checks(
    paths: Paths,
    failover: Failover | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    builtins: Sequence[BuiltinCheck] | None = None,
    only: Sequence[str] = (),
) -> RecoveryReport:
    """Every check (or those named in ``only``): the built-ins no executable replaces, then the executables."""
    if builtins is None:
        from agent.recovery.postgresql import PostgresqlCheck

        builtins = (PostgresqlCheck(),)
    started, start = time.time(), time.monotonic()
    own = executables(paths)
    replaced = {p.name for p in own}
    wanted = set(only)
    results: list[CheckResult] = []
    for check in builtins:
        if check.name in replaced or (wanted and check.name not in wanted):
            continue
        log.info("recovery check %s (built-in)", check.name)
        t = time.monotonic()
        try:
            results.append(check.run(paths, timeout))
        except Exception as e:  # a broken check fails; it never passes and never hides the others
            log.exception("recovery check %s could not run", check.name)
            why = f"could not run: {type(e).__name__}: {e}"
            results.append(CheckResult(check.name, "built-in", Outcome.FAILED, why, time.monotonic() - t))
    env = check_environment(failover, timeout)
    for path in own:
        if wanted and path.name not in wanted:
            continue
        log.info("recovery check %s", path)
        results.append(run_executable(path, paths.system_path(path), timeout, env))
    for r in results:
        log.info("recovery check %s: %s in %.1f s: %s", r.name, r.outcome.value, r.seconds, r.summary)
    return RecoveryReport(tuple(results), failover, started, time.monotonic() - start)


def render(report: RecoveryReport) -> str:
    """The human table: one line per check, then the output of each that failed."""
    lines = []
    if report.failover is not None:
        lines.append(f"this machine is {report.failover.describe()}")
    if not report.results:
        lines.append("no recovery check here (none built in applies, none in /etc/mobility/recovery.d/)")
    for r in report.results:
        lines.append(f"{r.outcome.value.upper():<8} {r.name:<20} {r.seconds:6.1f} s  {r.summary}")
    for r in report.results:
        if r.outcome is Outcome.FAILED and r.output.strip():
            lines += ["", f"--- {r.name} ({r.origin}), its last output:", r.output.rstrip()]
    return "\n".join(lines)
