"""docs/errors.md and the code must agree: every ID, its exit code and its remediation."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import server.api.app
import server.cli  # noqa: F401
from agent.host.paths import Paths
from agent.lifecycle.prereq.prerequisites import prerequisite_checks
from agent.shared.errors import all_errors
from tests import faults
from tests.conftest import REPO, WHOLE_SUITE, in_worker

_ROW = re.compile(r"^\| `([A-Z0-9-]+)` \|(.*)\|\s*$")


def _catalogue() -> dict[str, list[str]]:
    rows = {}
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split(" | ")]
    return rows


def test_every_error_is_catalogued_with_its_exit_code_and_fix() -> None:
    docs = _catalogue()
    errors = all_errors()
    for code, cls in errors.items():
        assert code in docs, f"{code} missing from docs/errors.md"
        exit_code, _when, fix = docs[code]
        assert int(exit_code) == int(cls.exit_code), code
        assert fix == cls.remediation, code


def test_every_prerequisite_check_is_catalogued() -> None:
    docs = _catalogue()
    for check in prerequisite_checks(Paths(Path("/"))):
        assert check.id in docs, f"{check.id} missing from docs/errors.md"
        title, fix = docs[check.id]
        assert (title, fix) == (check.title, check.remediation), check.id


def test_catalogue_has_nothing_the_code_lacks() -> None:
    known = set(all_errors()) | {c.id for c in prerequisite_checks(Paths(Path("/")))}
    assert set(_catalogue()) <= known


def _error_ids() -> set[str]:
    """The IDs of the catalogue's error rows (the prerequisite checks' rows have no exit code)."""
    return {code for code, cells in _catalogue().items() if cells[0].isdigit()}


def test_every_catalogued_error_was_raised_by_the_suite(request: pytest.FixtureRequest) -> None:
    """Every error ID of docs/errors.md was raised by the code under test in this session (in the pytest process or
    in any Python it started: tests/faults/ records them), or printed by a frozen program's launcher. Runs last, and
    only when the whole suite ran as root (integration tests included)."""
    if not request.config.stash.get(WHOLE_SUITE, False):
        pytest.skip("meaningful only when the whole suite runs (no -k, -m, or selected files)")
    if os.geteuid() != 0:
        pytest.skip("the integration tests, which raise many of these, need root")
    if in_worker(request.config):
        pytest.skip("a parallel run: the controlling process checks the record once every worker finished")
    missing = missing_from_record(Path(os.environ[faults.RECORD]))
    assert not missing, f"no test raised {', '.join(missing)}"


def missing_from_record(record: Path) -> list[str]:
    """The catalogued error IDs that no process of the run recorded in ``record``."""
    return sorted(_error_ids() - faults.recorded(record))


def test_the_record_sees_errors_raised_here_and_in_a_subprocess(tmp_path: Path) -> None:
    """The record check above can fail: an error made in this process, and one in a Python started with the
    suite's environment, are both recorded."""
    import subprocess
    import sys

    from agent.errors import OsUnknown

    stop = faults.record_errors(tmp_path)  # a second record of this process: into this test's directory
    try:
        with pytest.raises(OsUnknown):
            raise OsUnknown("nothing identifies this system")
    finally:
        stop()
    code = "from agent.errors import RootRequired\nRootRequired('not root')\n"
    env = {**os.environ, faults.RECORD: str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True, timeout=60)
    assert {"OS-UNKNOWN", "ROOT-REQUIRED"} <= faults.recorded(tmp_path)
