"""last-job.json has one owner (agent/lifecycle/lastjob.py): a job report as the server would accept it, and when it was
kept."""

from __future__ import annotations

import json
from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.lastjob import load_last_job, save_last_job
from agent.shared.wire import JobReport

JOB = JobReport(kind="install", state="running", hostname="web1", job_id="0b7e1a36-6a1d-4b7e-9e1c-2f0d6f2a8c11")


def test_save_then_load(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    save_last_job(paths, JOB, 1_800_000_000.0)
    last = load_last_job(paths)
    assert last is not None and last.report == JOB and last.recorded == "2027-01-15T08:00:00Z"
    assert not last.ended_well
    assert json.loads(paths.last_job.read_text())["reported"] == "2027-01-15T08:00:00Z"


def test_a_record_that_is_not_a_job_report_is_none(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert load_last_job(paths) is None
    paths.state_dir.mkdir(parents=True)
    for text in ("{", "[]", json.dumps({"state": "succeeded"}), json.dumps({**JOB.to_json(), "state": "done"})):
        paths.last_job.write_text(text)
        assert load_last_job(paths) is None, text
    paths.last_job.write_text(json.dumps({**JOB.to_json(), "state": "succeeded with warnings"}))
    last = load_last_job(paths)
    assert last is not None and last.ended_well and last.recorded == ""
