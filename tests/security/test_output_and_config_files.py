"""Other commands that take a path or read a file the agent does not own: `diagnostics -o FILE` (run as root,
often in a shared directory), and /etc/mobility/mobility.conf read by `run`, `status` and `health`. Before: -o
wrote through a link planted at FILE (overwriting its target, world-readable until the end), and a FIFO or a
device as mobility.conf hung or exhausted `health`."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.security.sandbox import error_id, make_root, mobility


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("diagnostics and health need root (ROOT-REQUIRED)")
    return make_root(tmp_path / "root")


def test_diagnostics_output_replaces_a_planted_link_never_writes_through_it(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "shared" / "diag.tar.gz"
    out.parent.mkdir()
    out.symlink_to(victim)
    r = mobility("diagnostics", "--root", str(root), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        assert "mobility-diagnostics/health.json" in tar.getnames()
    assert [p.name for p in out.parent.iterdir()] == ["diag.tar.gz"]  # no temporary file left


def test_diagnostics_output_that_cannot_be_written_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "diag.tar.gz", tmp_path / "dir-not-file"):
        if out.name == "dir-not-file":
            out.mkdir()
        r = mobility("diagnostics", "--root", str(root), "-o", str(out))
        assert (r.returncode, error_id(r)) == (1, "DIAGNOSTICS-WRITE-FAILED"), r.stderr
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "directory"])
def test_a_config_file_that_is_not_a_small_file_is_refused(root: Path, kind: str) -> None:
    conf = root / "etc/mobility/mobility.conf"
    conf.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(conf)
    elif kind == "dev-zero":
        (root / "dev").mkdir()
        os.mknod(root / "dev/zero", 0o644 | 0o020000, os.makedev(1, 5))
        conf.symlink_to("/dev/zero")  # inside the root: root/dev/zero
    elif kind == "huge":
        with conf.open("wb") as f:
            f.truncate(16 << 30)
    else:
        conf.mkdir()
    try:
        r = mobility("health", "--root", str(root))
    except subprocess.TimeoutExpired:
        pytest.fail(f"health with a {kind} mobility.conf hung")
    assert (r.returncode, error_id(r)) == (2, "CONFIG-INVALID"), r.stderr
