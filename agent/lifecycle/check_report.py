"""Checks as small objects: prerequisite checks now, health checks later, one shape for both."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Status(StrEnum):
    PASS = "PASS"  # noqa: S105 - a status, not a password
    WARN = "WARN"
    FAIL = "FAIL"
    UNKNOWN = "UNKNOWN"


# How bad a status is, for "the worst of" (UNKNOWN never hides a FAIL, never passes for PASS).
_SEVERITY = {Status.PASS: 0, Status.UNKNOWN: 1, Status.WARN: 2, Status.FAIL: 3}


@dataclass(frozen=True)
class Result:
    """The outcome of one check: stable ID, status, what was found and how to fix it."""

    id: str
    status: Status
    message: str
    remediation: str = ""
    value: str | None = None
    threshold: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {
            "id": self.id,
            "status": self.status.value,
            "message": self.message,
            "remediation": self.remediation,
            "value": self.value,
            "threshold": self.threshold,
        }


class Check(Protocol):
    """A check has a stable ID, a one-line title, the remediation for a failure, and a run method."""

    @property
    def id(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def remediation(self) -> str: ...

    def run(self) -> Result: ...


@dataclass(frozen=True)
class Report:
    results: Sequence[Result] = field(default_factory=tuple)

    @property
    def worst(self) -> Status:
        return max((r.status for r in self.results), key=_SEVERITY.__getitem__, default=Status.PASS)

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAIL for r in self.results)


def run_checks(checks: Iterable[Check]) -> Report:
    """Run every check; a check that raises is reported UNKNOWN with the reason, never PASS."""
    results: list[Result] = []
    for check in checks:
        try:
            results.append(check.run())
        except Exception as e:  # a broken check must not hide the others
            results.append(
                Result(
                    check.id,
                    Status.UNKNOWN,
                    f"{check.title}: could not run ({type(e).__name__}: {e})",
                    check.remediation,
                )
            )
    return Report(tuple(results))


def render(report: Report) -> str:
    """The human table: one line per check, the fix under every line that is not PASS."""
    lines = []
    for r in report.results:
        lines.append(f"{r.status.value:<8} {r.id:<22} {r.message}")
        if r.status is not Status.PASS and r.remediation:
            lines.append(f"{'':<8} {'':<22} fix: {r.remediation}")
    return "\n".join(lines)
