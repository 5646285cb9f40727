"""The frozen programs and the bundles, built once per test run (cached by a hash of the sources), and run as
shipped: in a debootstrap'd minimal Debian 12 root that has no Python, through chroot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.distros import SUPPORT_MATRIX
from agent.host.elf import is_elf, parse_elf
from agent.host.libc import glibc_version_of
from agent.host.runtime import kernel_floor_of
from agent.lifecycle.bundles import inspect_bundle, parse_bundle_name
from agent.shared.errors import BundleRefused
from agent.shared.fsutil import sha256_file
from tests import faults
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
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    faults.record_output(r.stdout, r.stderr)  # the frozen programs run no injector: what they print is the record
    return r


@pytest.fixture(scope="session")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal Debian 12 without Python (debootstrap --variant=minbase): this session's copy, which the tests
    change (other tests, maybe in other workers, copy the cached one)."""
    require_root()
    root = tmp_path_factory.mktemp("minbase") / "root"
    subprocess.run(["cp", "-a", str(make_debian_root("debian12-minbase")), str(root)], check=True, timeout=300)
    return root


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


@pytest.fixture
def unpacked_bootstrapper(dist: Path, tmp_path: Path) -> Path:
    """The bootstrapper's runtime, as its first start unpacks it (into a cache of the test's, not the real
    /var/lib/mobility)."""
    env = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [str(dist / "mobility-bootstrap"), "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    (entry,) = (tmp_path / "cache").iterdir()
    return entry


def test_bootstrapper_version_and_size(dist: Path, unpacked_bootstrapper: Path) -> None:
    assert (dist / "mobility-bootstrap").stat().st_size <= 20 * MIB
    info = json.loads((dist / "build-info.json").read_text())
    assert unpacked_bootstrapper.name == info["bootstrap_cache_id"]
    assert unpacked_bootstrapper.name.startswith("0.1.0-")


def frozen_modules(program: Path) -> set[str]:
    """The Python modules a frozen program carries (its PyInstaller archive, listed recursively)."""
    r = sh(str(REPO / ".venv" / "bin" / "pyi-archive_viewer"), "-l", "-r", str(program))
    assert r.returncode == 0, r.stderr
    return {line.rsplit("'", 2)[-2] for line in r.stdout.splitlines() if line.count("'") >= 2}


def test_bootstrapper_holds_what_bootstrapping_needs_and_nothing_of_the_server(unpacked_bootstrapper: Path) -> None:
    modules = frozen_modules(unpacked_bootstrapper / "mobility-bootstrap")
    for needed in (
        "agent.host.distros.detect",
        "agent.lifecycle.prereq",
        "agent.lifecycle.fetch",
        "agent.lifecycle.registration",
        "agent.lifecycle.bundles",
        "tuf.ngclient",
        "cryptography",
    ):
        assert any(m == needed or m.startswith(needed + ".") for m in modules), needed
    for absent in ("server", "aiohttp", "sqlalchemy", "alembic", "psycopg", "psutil", "schedule", "multiprocessing"):
        assert not any(m == absent or m.startswith(absent + ".") for m in modules), absent


@pytest.fixture
def unpacked_bundle(dist: Path, tmp_path: Path) -> Path:
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "bundle", filter="tar")
    return tmp_path / "bundle"


def test_no_frozen_program_holds_the_fault_injector(unpacked_bootstrapper: Path, unpacked_bundle: Path) -> None:
    """The fault points are compiled in, the injector never: nothing of tests/ and no sitecustomize to load it."""
    for program in (unpacked_bootstrapper / "mobility-bootstrap", unpacked_bundle / "mobility/_internal/mobility"):
        modules = frozen_modules(program)
        assert "agent.faults" in modules, program
        leaked = sorted(m for m in modules if m.split(".")[0] in ("tests", "sitecustomize"))
        assert not leaked, (program, leaked)


def test_a_frozen_program_cannot_be_made_to_load_the_injector(unpacked_bundle: Path, tmp_path: Path) -> None:
    """The environment that arms the injector in every Python of the suite does nothing to a frozen program: its
    interpreter reads no PYTHONPATH. The same command under this Python is recorded and killed (the control)."""
    record = tmp_path / "record"
    record.mkdir()
    env = {
        **faults.environment(kill={"bootstrap.step": 1}),
        "PYTHONPATH": os.pathsep.join((str(faults.SITE), str(REPO))),
        faults.RECORD: str(record),
    }
    frozen = subprocess.run(
        [str(unpacked_bundle / "mobility/mobility"), "detect-os", "--root", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (frozen.returncode, frozen.stderr.split(":")[0]) == (2, "error ROOT-NOT-FOUND"), frozen.stderr
    assert not list(record.iterdir())
    python = subprocess.run(
        [sys.executable, "-m", "agent", "detect-os", "--root", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert python.returncode == 2 and faults.recorded(record) == {"ROOT-NOT-FOUND"}


def _needed_resolve_inside(tree: Path) -> set[str]:
    """Every DT_NEEDED of every ELF file of ``tree`` is a file of the tree (or of a $ORIGIN run path in it); returns
    the sonames the tree needs."""
    needed: set[str] = set()
    for path in tree.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as f:
            if not is_elf(f.read(4)):
                continue
        elf = parse_elf(path.read_bytes())
        for soname in elf.needed:
            where = [tree, *(Path(p.replace("$ORIGIN", str(path.parent))) for p in elf.runpath)]
            assert any((d / soname).is_file() for d in where), f"{path.relative_to(tree)} needs {soname}"
            needed.add(soname)
    return needed


def test_the_frozen_trees_carry_their_whole_c_runtime(dist: Path, unpacked_bootstrapper: Path, tmp_path: Path) -> None:
    info = json.loads((dist / "build-info.json").read_text())
    runtime = info["runtime"]
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "b", filter="tar")
    agent = tmp_path / "b" / "mobility" / "_internal"
    for tree in (agent, unpacked_bootstrapper):
        needed = _needed_resolve_inside(tree)
        assert {"libc.so.6", "ld-linux-x86-64.so.2"} <= needed
        # What the build recorded is what it bundled, byte for byte, from the build host's C library.
        for soname, lib in runtime["libraries"].items():
            assert sha256_file(tree / soname) == lib["sha256"], soname
            assert Path(lib["source"]).is_file() and sha256_file(Path(lib["source"])) == lib["sha256"], soname
    assert {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"} <= runtime["libraries"].keys()
    assert runtime["libraries"]["libc.so.6"]["package"].startswith("libc6 ")
    assert runtime["glibc"] == glibc_version_of((agent / "libc.so.6").read_bytes())
    assert runtime["kernel_floor"] == kernel_floor_of((agent / "libc.so.6").read_bytes()) == "3.2"
    assert runtime["loader"] == {
        "interp": "/lib64/ld-linux-x86-64.so.2",
        "bundled_as": "_internal/ld-linux-x86-64.so.2",
    }
    # The launchers are static: nothing of the host's to load before the bundled loader takes over.
    for launcher in (tmp_path / "b" / "mobility" / "mobility", dist / "mobility-bootstrap"):
        elf = parse_elf(launcher.read_bytes())
        assert (elf.interp, elf.needed) == (None, ())


def test_frozen_programs_run_in_a_python_less_debian_root(debian_root: Path, chroot_dir: Path) -> None:
    assert not list((debian_root / "usr" / "bin").glob("python*")), "the test root must not have Python"
    r = sh("chroot", str(debian_root), "/opt/t/mobility-bootstrap", "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    shutil.rmtree(debian_root / "var" / "lib" / "mobility", ignore_errors=True)  # its cache: the root stays as made
    r = sh("chroot", str(debian_root), "/opt/t/bundle/mobility/mobility", "detect-os", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["os_tag"] == "DEBIAN12"
    r = sh("chroot", str(debian_root), "/opt/t/bundle/mobility/mobility", "prereq", "--json")
    checks = {c["id"]: c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks["PRQ-OS"] == "PASS" and checks["PRQ-KERNEL"] == "PASS" and checks["PRQ-ARCH"] == "PASS"
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


def test_every_default_bundle_is_named_and_hashed_correctly(dist: Path) -> None:
    bundles = sorted(dist.glob("*.tar.gz"))
    tags = {parse_bundle_name(b.name).os_tag for b in bundles}
    assert tags == {row.tag for row in SUPPORT_MATRIX if row.default_repo and row.supported}
    assert not tags & {"RHEL6", "OL6", "SLES11-SP4"}  # refused for their kernel: no bundle that cannot run
    info = json.loads((dist / "build-info.json").read_text())
    for b in bundles:
        _, manifest = inspect_bundle(b)  # every file's sha256 matches bundle.json
        assert (manifest.kernel_floor, manifest.runtime_glibc) == (
            info["runtime"]["kernel_floor"],
            info["runtime"]["glibc"],
        )
        with tarfile.open(b) as tar:
            names = set(tar.getnames())
        assert {"install", "configure", "uninstall", "bootstrap", "mobility/mobility", "freeze.d/README"} <= names
        assert {"mobility/_internal/mobility", "mobility/_internal/ld-linux-x86-64.so.2"} <= names
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
    r = sh(str(REPO / "packaging" / "build"), "--tags", "DEBIAN7", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    built = sorted(parse_bundle_name(b.name).os_tag for b in tmp_path.glob("*.tar.gz"))
    assert built == ["DEBIAN7"]
    assert inspect_bundle(next(tmp_path.glob("*.tar.gz")))[1].init == "sysv"


def test_refused_tags_are_never_built(tmp_path: Path) -> None:
    for tags in (["RHEL6"], ["DEBIAN12", "SLES11-SP3", "RHEL5"]):
        r = sh(str(REPO / "packaging" / "build"), "--tags", *tags, "--out", str(tmp_path))
        assert r.returncode == 2, r.stderr[-2000:]
        assert "older than 3.2, the oldest kernel the agent's bundled C library runs on" in r.stderr
        assert list(tmp_path.iterdir()) == []  # refused before anything was built


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


def test_the_agent_holds_nothing_of_the_server(dist: Path, tmp_path: Path) -> None:
    """The agent's frozen program (in every bundle) carries none of the server's packages: no web server, no
    database layer or drivers, no SSH client (packaging/build.py SERVER_ONLY)."""
    import importlib.util
    import sys

    # packaging/ is not a package (the name is PyPI's `packaging`): load build.py by its path.
    spec = importlib.util.spec_from_file_location("mobility_build", REPO / "packaging" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up there
    spec.loader.exec_module(build)

    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    (program,) = (p for p in tmp_path.rglob("_internal/mobility") if p.is_file())
    r = sh(str(REPO / ".venv" / "bin" / "pyi-archive_viewer"), "-l", "-r", str(program))
    assert r.returncode == 0, r.stderr
    modules = {line.rsplit("'", 2)[-2] for line in r.stdout.splitlines() if line.count("'") >= 2}
    assert any(m.startswith("agent.") for m in modules)
    for absent in build.SERVER_ONLY:
        assert not any(m == absent or m.startswith(absent + ".") for m in modules), absent
