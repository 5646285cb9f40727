"""Recovery checks: the executables in /etc/mobility/recovery.d/ that prove a failed-over copy of this machine works,
run inside that copy (docs/recovery-checks.md).

`test-failover --boot` runs them in the booted point; `mobility recovery-check` runs them the same way on a failed-over
machine (after a real failover, or to try a check): in name order, one at a time, as root, in /, stdin from /dev/null,
in a session of their own, with the failover in their environment (``MOBILITY_FAILOVER`` = ``test`` or
``failover``, ``MOBILITY_FAILOVER_POINT``, ``MOBILITY_FAILOVER_SOURCE``) and their time budget
(``MOBILITY_CHECK_TIMEOUT``). Names are those run-parts would run (letters, digits, ``_``, ``-``, ``.``; not a dot
first, no ``.dpkg-`` leftovers, no ``~`` backups); other entries and files that are not executable are reported
skipped, with why. Exit 0 is `passed`, anything else `failed`; one that outlives its budget is killed with what it
started, and has failed. Each check's output (stdout and stderr together, through a file: a chatty check costs no
memory) is kept to its last ``OUTPUT_TAIL`` bytes.

The agent installs its own checks there too (agent/recovery/builtins.py)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.errors import CommandFailed
from agent.host.paths import Paths
from agent.host.proc import run
from agent.lifecycle.failover import Failover

log = logging.getLogger("mobility.recovery")

OUTPUT_TAIL = 16 * 1024
DEFAULT_TIMEOUT = 600.0  # seconds per check: a database's WAL replay and a full consistency check take minutes
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"  # not run: a name run-parts would not run, not executable, or a built-in that does not apply


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: its name, where it came from (its path, or ``built-in``), a one-line summary, how long
    it ran and the end of what it said."""

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


def runnable_name(name: str) -> bool:
    """A name run-parts runs: letters, digits, ``_``, ``-`` and ``.``, not a dot first, no package leftover or
    editor backup (pure)."""
    return bool(_NAME.fullmatch(name)) and not name.startswith(".") and ".dpkg-" not in name and not name.endswith("~")


def entries(paths: Paths) -> list[Path]:
    """Everything in recovery.d, in name order (byte order, as the shell's glob in the C locale sorts)."""
    try:
        return sorted(paths.recovery_dir.iterdir(), key=lambda p: os.fsencode(p.name))
    except OSError:
        return []


def check_environment(failover: Failover | None, timeout: float) -> dict[str, str]:
    """What a check learns about the failover it runs in (pure)."""
    env = {"MOBILITY_CHECK_TIMEOUT": f"{timeout:.0f}"}
    if failover is not None:
        env["MOBILITY_FAILOVER"] = failover.kind
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
            done = run([str(path)], timeout=timeout, check=False, env=env, output=out, cwd="/")
            code: int | None = done.returncode
            why = ""
        except CommandFailed as e:
            code, why = None, e.message
        seconds = time.monotonic() - start
        out.seek(0, 2)
        out.seek(max(0, out.tell() - OUTPUT_TAIL - 256))
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
    paths: Paths, failover: Failover | None, *, timeout: float = DEFAULT_TIMEOUT, only: Sequence[str] = ()
) -> RecoveryReport:
    """Every check of recovery.d (or those named in ``only``), one at a time, in name order."""
    started, start = time.time(), time.monotonic()
    env = check_environment(failover, timeout)
    results: list[CheckResult] = []
    for path in entries(paths):
        if only and path.name not in only:
            continue
        origin = paths.system_path(path)
        if not runnable_name(path.name):
            results.append(CheckResult(path.name, origin, Outcome.SKIPPED, "not a name run-parts runs", 0.0))
            continue
        if not path.is_file() or not os.access(path, os.X_OK):
            results.append(CheckResult(path.name, origin, Outcome.SKIPPED, "not an executable file", 0.0))
            continue
        log.info("recovery check %s", origin)
        result = run_executable(path, origin, timeout, env)
        log.info(
            "recovery check %s: %s in %.1f s: %s", result.name, result.outcome.value, result.seconds, result.summary
        )
        results.append(result)
    return RecoveryReport(tuple(results), failover, started, time.monotonic() - start)


def render(report: RecoveryReport) -> str:
    """The human table: one line per check, then the output of each that failed."""
    lines = []
    if report.failover is not None:
        lines.append(f"this machine is {report.failover.describe()}")
    if not report.results:
        lines.append("no recovery check in /etc/mobility/recovery.d/")
    for r in report.results:
        lines.append(f"{r.outcome.value.upper():<8} {r.name:<20} {r.seconds:6.1f} s  {r.summary}")
    for r in report.results:
        if r.outcome is Outcome.FAILED and r.output.strip():
            lines += ["", f"--- {r.name} ({r.origin}), its last output:", r.output.rstrip()]
    return "\n".join(lines)
