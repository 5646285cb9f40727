"""What a push keeps on the server: a job per host, closed even when the push that ran it was killed."""

from __future__ import annotations

from pathlib import Path

from server.database.connection import parse_database
from server.database.storage import Storage
from server.push.remote import STALE_AFTER
from server.push.run import close_interrupted


def test_jobs_of_a_killed_push_are_closed_by_the_next_one(database: str) -> None:
    storage = Storage.open(parse_database(database), create=True)
    now = 1_800_000_000.0
    common = {"host_id": None, "kind": "push", "error_id": None, "remediation": None, "detail": None}
    killed = storage.record_job(job_id=None, hostname="web1:22", state="running", now=now - STALE_AFTER - 1, **common)
    running = storage.record_job(job_id=None, hostname="web2:22", state="running", now=now - 60, **common)
    done = storage.record_job(job_id=None, hostname="web3:22", state="succeeded", now=now - 3 * STALE_AFTER, **common)
    other = storage.record_job(
        job_id=None, hostname="vm", state="running", now=now - 3 * STALE_AFTER, **{**common, "kind": "install"}
    )
    assert close_interrupted(storage, now) == [killed]
    states = {j.job_id: (j.state, j.error_id) for j in storage.jobs()}
    assert states == {
        killed: ("failed", "PUSH-INTERRUPTED"),
        running: ("running", None),  # another push may still be at it
        done: ("succeeded", None),
        other: ("running", None),  # not a push: the agent's own job
    }
    assert close_interrupted(storage, now) == []
    storage.close()


def test_no_bundle_for_the_host_s_tag_or_a_changed_file_is_refused(tmp_path: Path) -> None:
    import shutil

    import pytest

    from server.datadir import DataDir
    from server.errors import PushNoBundle
    from server.push.run import BundleChooser
    from server.releases.repository import Repository
    from tests.bundle_factory import make_bundle

    data = DataDir(tmp_path / "data")
    repo = Repository.create(data)
    with pytest.raises(PushNoBundle, match="no bundle for DEBIAN12"):
        BundleChooser(data)("DEBIAN12")
    repo.add([make_bundle(tmp_path / "in", "DEBIAN12", "0.1.0")])
    chosen = BundleChooser(data)("DEBIAN12")
    assert chosen.name.startswith("Mobility_UA_0.1.0_DEBIAN12-64_")
    changed = make_bundle(tmp_path / "other", "DEBIAN12", "0.1.0", files={"install": b"#!/bin/sh\nexit 1\n"})
    shutil.copyfile(changed, chosen.path)
    with pytest.raises(PushNoBundle, match="does not match its published hash"):
        BundleChooser(data)("DEBIAN12")
