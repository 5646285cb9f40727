"""docs/errors.md and the code must agree: every ID, its exit code and its remediation."""

from __future__ import annotations

import re
from pathlib import Path

import agent.cli
import agent.registration  # noqa: F401
import server.app
import server.cli  # noqa: F401
from agent.paths import Paths
from agent.prereq import prerequisite_checks
from agent.shared.errors import all_errors
from tests.conftest import REPO

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
