"""Calls that need the machine's certificate refuse clearly before registration."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import NotRegistered
from agent.host.paths import Paths
from agent.lifecycle.registration import authenticated_client, report_job


def test_no_authenticated_call_before_registration(tmp_path: Path) -> None:
    with pytest.raises(NotRegistered):
        authenticated_client(Paths(tmp_path))


def test_a_job_without_registration_or_secret_cannot_be_reported(tmp_path: Path) -> None:
    with pytest.raises(NotRegistered) as e:
        report_job(Paths(tmp_path), {"kind": "install", "state": "failed", "hostname": "h"})
    assert "no passphrase" in e.value.message
