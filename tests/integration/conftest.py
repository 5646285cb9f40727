"""Fixtures of the integration tests that need more than one version of the agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root

BROKEN = REPO / "tests" / "integration" / "broken_agent.py"
TAGS = ("DEBIAN12", "UBUNTU-14.04")


@pytest.fixture(scope="session")
def releases(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """version -> the directory of its bundles: 0.1.0 is the suite's build; 0.1.1 the same frozen programs packed
    as 0.1.1 (seconds); 0.1.2 (crashes at start) and 0.1.3 (reports CRITICAL) one test build of broken_agent.py."""
    require_root()
    out = {"0.1.0": dist}
    for version, entry in (("0.1.1", None), ("0.1.2", BROKEN), ("0.1.3", BROKEN)):
        where = tmp_path_factory.mktemp(f"dist-{version}")
        cmd = [sys.executable, str(REPO / "packaging" / "build.py"), "--out", str(where), "--version", version]
        cmd += ["--tags", *TAGS, *(["--test-entry", str(entry)] if entry else ["--bundles-only"])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, cwd=REPO)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[version] = where
    return out
