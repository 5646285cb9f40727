"""The last job this machine ran, /var/lib/mobility/last-job.json: what the bootstrap reported (or tried to) to the
server, kept for `mobility status` and for the next bootstrap (a run killed before its job ended is not current).
The one typed load and save of that file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.host.paths import Paths
from agent.shared import timefmt
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file
from agent.shared.wire import JobReport

MAX_RECORD_BYTES = 64 * 1024  # a job report is at most a few KiB


@dataclass(frozen=True)
class LastJob:
    report: JobReport
    recorded: str  # when (timefmt.iso)

    @property
    def ended_well(self) -> bool:
        return self.report.state in ("succeeded", "succeeded with warnings")

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), "reported": self.recorded}


def save_last_job(paths: Paths, report: JobReport, now: float) -> None:
    atomic_write(paths.last_job, json.dumps(LastJob(report, timefmt.iso(now)).to_json(), indent=2).encode())


def load_last_job(paths: Paths) -> LastJob | None:
    """The record, or None when there is none or it is not a job report."""
    try:
        doc = json.loads(read_small_file(paths.last_job, MAX_RECORD_BYTES)[1])
        report = JobReport.from_json(doc)
    except (OSError, NotSmallRegularFile, ValueError):  # WireError is a ValueError
        return None
    reported = doc.get("reported")
    return LastJob(report, reported if isinstance(reported, str) else "")
