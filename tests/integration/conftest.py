"""Fixtures of the integration tests that need more than one version of the agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import workers
from tests.conftest import REPO, packaging_build, require_root

BROKEN = REPO / "tests" / "integration" / "broken_agent.py"
TAGS = ("DEBIAN12", "UBUNTU-14.04")


@pytest.fixture(scope="session")
def releases(dist: Path) -> dict[str, Path]:
    """version -> the directory of its bundles: 0.1.0 is the suite's build; 0.1.1 the same frozen programs packed
    as 0.1.1 (seconds); 0.1.2 (crashes at start) and 0.1.3 (reports CRITICAL) one test build of broken_agent.py.
    Made once per run, shared by its workers."""
    require_root()
    out = {"0.1.0": dist}
    for version, entry in (("0.1.1", None), ("0.1.2", BROKEN), ("0.1.3", BROKEN)):
        args = ["--version", version, "--tags", *TAGS, *(["--test-entry", str(entry)] if entry else ["--bundles-only"])]
        out[version] = workers.once(f"dist-{version}", lambda where, a=args: packaging_build("--out", str(where), *a))
    return out
