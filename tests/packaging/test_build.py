"""The frozen programs and the bundles, built once per test run (cached by a hash of the sources), and run as
shipped: in a debootstrap'd minimal Debian 12 root that has no Python, through chroot."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bundles import inspect_bundle, parse_bundle_name
from agent.distros import SUPPORT_MATRIX
from agent.errors import BundleRefused
from tests.conftest import REPO, require_root
from tests.integration.serverproc import (
    configure_root,
    fetch_as,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
)
from tests.integration.serverproc import debian_root as make_debian_root

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def sh(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def debian_root() -> Path:
    """A minimal Debian 12 without Python (debootstrap --variant=minbase)."""
    require_root()
    return make_debian_root("debian12-minbase")


@pytest.fixture
def chroot_dir(debian_root: Path, dist: Path) -> Iterator[Path]:
    """The DEBIAN12 bundle and the bootstrapper placed in the Debian root under /opt/t; removed afterwards."""
    where = debian_root / "opt" / "t"
    shutil.rmtree(where, ignore_errors=True)
    (where / "bundle").mkdir(parents=True)
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(where / "bundle", filter="tar")
    shutil.copy2(dist / "mobility-bootstrap", where / "mobility-bootstrap")
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_bootstrapper_version_and_size(dist: Path) -> None:
    r = sh(str(dist / "mobility-bootstrap"), "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0")
    assert (dist / "mobility-bootstrap").stat().st_size <= 20 * MIB


def test_bootstrapper_holds_what_bootstrapping_needs_and_nothing_of_the_server(dist: Path) -> None:
    r = sh(str(REPO / ".venv" / "bin" / "pyi-archive_viewer"), "-l", "-r", str(dist / "mobility-bootstrap"))
    assert r.returncode == 0, r.stderr
    modules = {line.rsplit("'", 2)[-2] for line in r.stdout.splitlines() if line.count("'") >= 2}
    for needed in (
        "agent.distros.detect",
        "agent.prereq",
        "agent.fetch",
        "agent.registration",
        "agent.bundles",
        "tuf.ngclient",
        "cryptography",
    ):
        assert any(m == needed or m.startswith(needed + ".") for m in modules), needed
    for absent in ("server", "aiohttp", "psutil", "schedule"):
        assert not any(m == absent or m.startswith(absent + ".") for m in modules), absent


def test_frozen_programs_run_in_a_python_less_debian_root(debian_root: Path, chroot_dir: Path) -> None:
    assert not list((debian_root / "usr" / "bin").glob("python*")), "the test root must not have Python"
    r = sh("chroot", str(debian_root), "/opt/t/mobility-bootstrap", "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    r = sh("chroot", str(debian_root), "/opt/t/bundle/mobility/mobility", "detect-os", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["os_tag"] == "DEBIAN12"
    r = sh("chroot", str(debian_root), "/opt/t/bundle/mobility/mobility", "prereq", "--json")
    checks = {c["id"]: c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks["PRQ-OS"] == "PASS" and checks["PRQ-GLIBC"] == "PASS" and checks["PRQ-ARCH"] == "PASS"
    assert len(checks) == 8


def test_bundle_installs_into_a_root_and_uninstalls(debian_root: Path, chroot_dir: Path) -> None:
    bundle = chroot_dir / "bundle"
    r = sh(
        str(bundle / "install"),
        "-d",
        "/usr/local/mobility",
        "-r",
        "MS",
        "-v",
        "VmWare",
        "-q",
        "--root",
        str(debian_root),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    current = debian_root / "usr" / "local" / "mobility" / "current"
    assert current.is_symlink() and (current / ".complete").exists()
    r = sh("chroot", str(debian_root), "/usr/local/mobility/current/mobility/mobility", "--version")
    assert r.stdout.strip() == "mobility 0.1.0"
    assert json.loads((debian_root / "etc/mobility/agent.json").read_text())["role"] == "MS"
    r = sh(str(bundle / "uninstall"), "-Y", "--root", str(debian_root))
    assert r.returncode == 0, r.stderr
    assert not (debian_root / "usr" / "local" / "mobility").exists()
    assert not (debian_root / "etc" / "mobility").exists()


def test_changed_file_in_an_unpacked_bundle_is_refused(debian_root: Path, chroot_dir: Path) -> None:
    bundle = chroot_dir / "bundle"
    (bundle / "freeze.d" / "README").write_text("changed\n")
    r = sh(str(bundle / "install"), "-r", "MS", "-v", "VmWare", "-q", "--root", str(debian_root))
    assert (r.returncode, r.stderr.split(":")[0]) == (1, "error BUNDLE-REFUSED"), r.stderr
    assert not (debian_root / "usr" / "local" / "mobility").exists()


def test_older_glibc_than_the_floor_is_a_clear_error_not_a_loader_crash(chroot_dir: Path) -> None:
    bundle = chroot_dir / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["glibc_floor"] = "9.99"  # as a system older than the build host would see it
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    r = sh(str(bundle / "install"), "-r", "MS", "-v", "VmWare", "-q")
    assert r.returncode == 3
    assert r.stderr.startswith("error PRQ-GLIBC: glibc ") and "older than 9.99" in r.stderr


def test_every_default_bundle_is_named_and_hashed_correctly(dist: Path) -> None:
    bundles = sorted(dist.glob("*.tar.gz"))
    tags = {parse_bundle_name(b.name).os_tag for b in bundles}
    assert tags == {row.tag for row in SUPPORT_MATRIX if row.default_repo}
    info = json.loads((dist / "build-info.json").read_text())
    for b in bundles:
        _, manifest = inspect_bundle(b)  # every file's sha256 matches bundle.json
        assert manifest.glibc_floor == info["glibc_floor"]
        with tarfile.open(b) as tar:
            names = set(tar.getnames())
        assert {"install", "configure", "uninstall", "bootstrap", "mobility/mobility", "freeze.d/README"} <= names
        assert ("units/mobility.service" in names) == (manifest.init == "systemd")
        assert ("init.d/mobility" in names) == (manifest.init == "sysv")


def test_a_bundle_with_a_file_changed_is_refused(dist: Path, tmp_path: Path) -> None:
    (bundle,) = dist.glob("*_UBUNTU-22.04-64_*.tar.gz")
    work = tmp_path / "x"
    with tarfile.open(bundle) as tar:
        tar.extractall(work, filter="tar")
    (work / "install").write_text("#!/bin/sh\necho owned\n")
    forged = tmp_path / bundle.name
    with tarfile.open(forged, "w:gz") as tar:
        for p in sorted(work.iterdir()):
            tar.add(p, arcname=p.name)
    with pytest.raises(BundleRefused, match="'install' has sha256"):
        inspect_bundle(forged)


def test_only_requested_manual_tags(dist: Path, tmp_path: Path) -> None:
    r = sh(str(REPO / "packaging" / "build"), "--tags", "DEBIAN7", "SLES11-SP3", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    built = sorted(parse_bundle_name(b.name).os_tag for b in tmp_path.glob("*.tar.gz"))
    assert built == ["DEBIAN7", "SLES11-SP3"]
    for b in tmp_path.glob("*.tar.gz"):
        assert inspect_bundle(b)[1].init == "sysv"


def test_published_bundles_are_listed_and_fetchable(dist: Path, server_data: Path, tmp_path: Path) -> None:

    listing = json.loads(server_cli(server_data, "repo", "list", "--json", check=True).stdout)
    assert sorted(e["name"] for e in listing) == sorted(b.name for b in dist.glob("*.tar.gz"))
    server = start_server(server_data)
    try:
        root = sandbox_root(tmp_path / "m", "b0" * 16)
        assert configure_root(server, root, secret_file(tmp_path / "pass", server.passphrase()))[0] == 0
        got = fetch_as(server, root, "DEBIAN12", tmp_path / "dl")
        (expected,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
        assert got.read_bytes() == expected.read_bytes()
    finally:
        server.stop()
