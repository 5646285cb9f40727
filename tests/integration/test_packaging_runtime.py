"""The frozen programs carry their own C runtime (packaging/README.md). Proven here on roots the host's libc cannot
serve: one that holds no C library at all, and one whose libc.so.6 is not a C library (the host's loader beside it,
so that anything started the host's way fails). In both, through chroot, the bootstrapper and the agent run
--version, detect-os and prereq, bootstrap (fetch over TLS, install, register with mutual TLS) and the daemon
heartbeats to a real server on loopback. Also: the kernel floor refusal, the launchers' own errors, and the
bootstrapper's cache (concurrent first starts, a start killed while unpacking, a damaged payload)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import BootstrapUnpackFailed, RuntimeMissing
from agent.lifecycle.prereq.prerequisites import KernelFloor
from tests import faults
from tests.conftest import DISTROS
from tests.integration.serverproc import ServerProcess, sandbox_root, secret_file, server_cli, start_server, wait_for

pytestmark = pytest.mark.integration

HOST_LOADER = Path("/lib64/ld-linux-x86-64.so.2")
KERNEL_MESSAGE = "Linux {release} is older than 3.2, the oldest kernel the agent's bundled C library runs on"


def sh(*cmd: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, env=env)
    faults.record_output(r.stdout, r.stderr)  # the frozen programs and their launchers run no injector
    return r


def with_kernel(release: str, where: Path, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """``cmd`` in a private mount namespace whose /proc/sys/kernel/osrelease says ``release``: what `uname -r`
    prints as the entry scripts, the launchers and PRQ-KERNEL read it. Nothing of the product is told to pretend."""
    fake = where / "osrelease"
    fake.write_text(release + "\n")
    script = 'mount --bind "$1" /proc/sys/kernel/osrelease && shift && exec "$@"'
    return sh("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", fake, *cmd)


@pytest.fixture
def server(tmp_path: Path, dist: Path) -> Iterator[ServerProcess]:
    s = start_server(tmp_path / "data", heartbeat_interval=2.0)
    try:
        (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
        server_cli(s.data, "repo", "add", str(bundle), check=True)
        yield s
    finally:
        s.stop()


def _bare_root(where: Path, dist: Path, server: ServerProcess, libc: str) -> Path:
    """Release files of Debian 12, /proc and a few device nodes, the DEBIAN12 bundle in /opt/bundle, the
    bootstrapper in /opt, and /m: the machine to bootstrap (--root /m), with its bootstrap.conf. ``libc``: "none",
    or "wrong": every lib*/libc.so.6 a copy of libz and the host's own loader in /lib64."""
    (where / "etc").mkdir(parents=True)
    for f in (DISTROS / "debian12" / "etc").iterdir():
        shutil.copy2(f, where / "etc" / f.name)
    (where / "dev").mkdir()
    for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)):
        os.mknod(where / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    (where / "proc").mkdir()
    (where / "tmp").mkdir(mode=0o1777)
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(where / "opt" / "bundle", filter="tar")
    shutil.copy2(dist / "mobility-bootstrap", where / "opt" / "mobility-bootstrap")
    machine = sandbox_root(where / "m", "c0" * 16)
    (machine / "etc" / "mobility").mkdir()
    secret_file(machine / "etc" / "mobility" / "passphrase", server.passphrase())
    (machine / "etc" / "mobility" / "bootstrap.conf").write_text(
        f"server = {server.address}\nfingerprint = {server.fingerprint}\npassphrase_file = /etc/mobility/passphrase\n"
    )
    if libc == "wrong":
        not_libc = Path("/lib/x86_64-linux-gnu/libz.so.1").read_bytes()
        for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64"):
            (where / d).mkdir(parents=True, exist_ok=True)
            (where / d / "libc.so.6").write_bytes(not_libc)
        shutil.copy2(HOST_LOADER.resolve(), where / "lib64" / HOST_LOADER.name)
        (where / "bin").mkdir()
        shutil.copy2("/bin/true", where / "bin" / "true")
    return where


@pytest.fixture(params=["none", "wrong"])
def bare_root(request: pytest.FixtureRequest, tmp_path: Path, dist: Path, server: ServerProcess) -> Iterator[Path]:
    root = _bare_root(tmp_path / "root", dist, server, request.param)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True, timeout=30)
    try:
        yield root
    finally:
        if sh("umount", root / "proc").returncode:
            sh("umount", "--lazy", root / "proc")


def _libc_files(root: Path) -> list[Path]:
    """Every libc.so* of the root outside the bundle (/opt) and the kernel's /proc and /dev."""
    found = []
    for top in sorted(p for p in root.iterdir() if p.name not in ("opt", "proc", "dev")):
        found += list(top.rglob("libc.so*")) if top.is_dir() else []
    return found


def test_frozen_programs_bootstrap_and_heartbeat_without_the_hosts_libc(bare_root: Path, server: ServerProcess) -> None:
    root = bare_root
    if (root / "bin" / "true").exists():
        # The trap is armed: a program started the host's way loads this root's libc.so.6, which is not one.
        r = sh("chroot", root, "/bin/true")
        assert r.returncode != 0 and "libc.so.6" in r.stderr, r.stderr
    else:
        assert _libc_files(root) == [] and not (root / "lib64").exists()

    r = sh("chroot", root, "/opt/mobility-bootstrap", "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    assert [p.name for p in (root / "var/lib/mobility/bootstrap").iterdir()]  # unpacked into the machine's state
    agent = "/opt/bundle/mobility/mobility"
    r = sh("chroot", root, agent, "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility 0.1.0"), r.stderr
    r = sh("chroot", root, agent, "detect-os", "--json")
    assert (r.returncode, json.loads(r.stdout)["os_tag"]) == (0, "DEBIAN12"), r.stderr
    r = sh("chroot", root, agent, "prereq", "--json")
    checks = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert {i: checks[i]["status"] for i in ("PRQ-OS", "PRQ-ARCH", "PRQ-KERNEL")} == dict.fromkeys(
        ("PRQ-OS", "PRQ-ARCH", "PRQ-KERNEL"), "PASS"
    )
    assert checks["PRQ-KERNEL"]["value"] == os.uname().release

    # The whole lifecycle on /m: TUF fetch over TLS, install, registration, mutual TLS for the job report.
    r = sh("chroot", root, "/opt/mobility-bootstrap", "--root", "/m", "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    outcome = json.loads(r.stdout)
    assert outcome["state"] in ("succeeded", "succeeded with warnings")
    (job,) = server.jobs()
    assert (job["state"], job["host_id"]) == (outcome["state"], outcome["host_id"])

    # The installed agent's daemon heartbeats over mutual TLS; every C library it maps is the bundled one, also
    # after it restarts itself (memory past its budget: it executes itself again, through the bundled loader).
    installed = "/m/usr/local/mobility/current/mobility/mobility"
    conf = root / "m/etc/mobility/mobility.conf"
    conf.write_text(json.dumps({"health_seconds": 1}))
    daemon = subprocess.Popen(
        ["chroot", str(root), installed, "run", "--root", "/m"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    status, log = root / "m/var/lib/mobility/daemon.json", root / "m/var/log/mobility/agent.log"

    def record() -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(status.read_text()))
        return {}

    def runs_on_the_bundled_libc() -> None:
        maps = Path(f"/proc/{daemon.pid}/maps").read_text()
        libcs = {line.split()[-1] for line in maps.splitlines() if "/libc.so" in line or "/ld-linux" in line}
        runtime = "/m/usr/local/mobility/versions/0.1.0/mobility/_internal/"
        assert libcs and all(p.removeprefix(str(root)).startswith(runtime) for p in libcs), libcs
        assert Path(f"/proc/{daemon.pid}/comm").read_text().strip() == "mobility"

    try:
        wait_for("heartbeats from the daemon", lambda: record().get("heartbeats_sent", 0) >= 2, timeout=60)
        (machine,) = server.machines()
        assert (machine["host_id"], machine["state"]) == (outcome["host_id"], "online")
        runs_on_the_bundled_libc()

        # A frozen program holds no fault injector (test_packaging_build.py proves it): its real RSS is put past the
        # budget by a budget under it. It restarts itself, and again at every start, until the budget it reads at
        # start is raised again (replaced whole: a start must never read half a file).
        first_start = record()["started"]
        _replace(conf, json.dumps({"health_seconds": 1, "memory_budget_mib": 1}))
        daemon.send_signal(signal.SIGHUP)
        wait_for("a clean restart", lambda: log.read_text().count("daemon started") >= 2, timeout=60)
        assert "past the budget, restarting cleanly" in log.read_text()
        _replace(conf, json.dumps({"health_seconds": 1}))
        wait_for(
            "the restarted daemon's heartbeat under the raised budget",
            lambda: (
                record().get("started", 0) > first_start
                and record().get("heartbeats_sent", 0) >= 1
                and _status_of("HLT-RSS", record()) == "PASS"
            ),
            timeout=60,
        )
        assert daemon.poll() is None and record()["pid"] == daemon.pid  # in place, as systemd expects
        runs_on_the_bundled_libc()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)
    assert daemon.returncode == 0, daemon.stderr.read().decode() if daemon.stderr else ""


def _status_of(check: str, record: dict[str, Any]) -> str | None:
    return next((c["status"] for c in record.get("health", {}).get("checks", []) if c["id"] == check), None)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


# The kernel floor ---------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path, dist: Path) -> Path:
    (archive,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    where = tmp_path / "bundle"
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="tar")
    return where


def _kernel_refusal(r: subprocess.CompletedProcess[str], release: str) -> None:
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr == f"error PRQ-KERNEL: {KERNEL_MESSAGE.format(release=release)}\n  fix: {KernelFloor.remediation}\n"


def test_a_kernel_older_than_the_floor_is_refused_by_the_entry_script_and_the_launchers(
    bundle: Path, dist: Path, tmp_path: Path
) -> None:
    assert json.loads((bundle / "bundle.json").read_text())["kernel_floor"] == "3.2"
    old = "3.1.0-test"
    _kernel_refusal(with_kernel(old, tmp_path, bundle / "install", "-r", "MS", "-v", "VmWare", "-q"), old)
    _kernel_refusal(with_kernel(old, tmp_path, bundle / "mobility" / "mobility", "--version"), old)
    cache = {"MOBILITY_BOOTSTRAP_CACHE": str(tmp_path / "cache")}
    _kernel_refusal(
        with_kernel(old, tmp_path, "env", *(f"{k}={v}" for k, v in cache.items()), dist / "mobility-bootstrap"), old
    )
    _kernel_refusal(with_kernel("2.6.32-754.el6.x86_64", tmp_path, bundle / "configure"), "2.6.32-754.el6.x86_64")
    assert not (tmp_path / "cache").exists()  # refused before anything was unpacked


def test_the_floor_itself_and_newer_kernels_run(bundle: Path, tmp_path: Path) -> None:
    r = with_kernel("3.2.0-4-amd64", tmp_path, bundle / "uninstall", "--help")  # Debian 7's kernel
    assert r.returncode == 0 and "uninstall" in r.stdout, r.stderr
    # The agent reads the same release: PRQ-KERNEL reports it, and fails it against a floor above it.
    agent = bundle / "mobility" / "mobility"
    r = with_kernel("5.10.0-28-amd64", tmp_path, agent, "prereq", "--json", "--kernel-floor", "6.1")
    kernel = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["PRQ-KERNEL"]
    assert (kernel["status"], kernel["value"], kernel["threshold"]) == ("FAIL", "5.10.0-28-amd64", "6.1")


# The launchers' own errors ------------------------------------------------------------------------------------


def test_a_launcher_without_its_runtime_says_so(bundle: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy2(bundle / "mobility" / "mobility", lone / "mobility")
    r = sh(lone / "mobility", "--version")
    assert r.returncode == 1
    assert r.stderr.startswith("error RUNTIME-MISSING: cannot run ")
    assert r.stderr.endswith(f"\n  fix: {RuntimeMissing.remediation}\n")


def _bootstrapper(dist: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return sh(dist / "mobility-bootstrap", *args, env={**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)})


def test_a_truncated_or_damaged_bootstrapper_is_refused_and_nothing_is_cached(dist: Path, tmp_path: Path) -> None:
    data = (dist / "mobility-bootstrap").read_bytes()
    truncated = tmp_path / "truncated"
    truncated.write_bytes(data[: len(data) // 2])
    truncated.chmod(0o755)
    r = sh(truncated, "--version", env={**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(tmp_path / "c1")})
    assert r.returncode == 1 and r.stderr.startswith("error RUNTIME-MISSING: "), r.stderr
    assert "carries no runtime payload" in r.stderr and r.stderr.endswith(f"fix: {RuntimeMissing.remediation}\n")

    damaged = tmp_path / "damaged"
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF  # inside the compressed payload
    damaged.write_bytes(bytes(middle))
    damaged.chmod(0o755)
    cache = tmp_path / "c2"
    r = sh(damaged, "--version", env={**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)})
    assert r.returncode == 1 and r.stderr.startswith("error BOOTSTRAP-UNPACK-FAILED: "), r.stderr
    assert "damaged" in r.stderr and r.stderr.endswith(f"fix: {BootstrapUnpackFailed.remediation}\n")
    assert list(cache.iterdir()) == []  # neither a cache entry nor a half-unpacked directory


def test_an_unsafe_cache_directory_is_refused(dist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # anyone could swap what root then runs
    r = _bootstrapper(dist, cache, "--version")
    assert r.returncode == 1 and r.stderr.startswith("error BOOTSTRAP-UNPACK-FAILED: "), r.stderr
    assert "writable by it alone" in r.stderr and list(cache.iterdir()) == []


def test_the_bootstrapper_unpacks_once_and_replaces_other_versions(dist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ident = json.loads((dist / "build-info.json").read_text())["bootstrap_cache_id"]
    (cache / "0.0.9-0123456789abcdef" / "stale").mkdir(parents=True)  # a previous bootstrapper's cache
    cache.chmod(0o700)
    r = _bootstrapper(dist, cache, "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    assert [p.name for p in cache.iterdir()] == [ident]
    program = cache / ident / "mobility-bootstrap"
    before = program.stat().st_mtime_ns
    r = _bootstrapper(dist, cache, "--version")
    assert r.returncode == 0 and program.stat().st_mtime_ns == before  # used as it is, not unpacked again


def test_concurrent_first_starts_share_one_cache_entry(dist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)}
    procs = [
        subprocess.Popen([str(dist / "mobility-bootstrap"), "--version"], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert outs == ["mobility-bootstrap 0.1.0"] * 4
    assert len(list(cache.iterdir())) == 1  # one entry, no .tmp directory left by the ones that lost the rename


def test_a_start_killed_while_unpacking_leaves_nothing_the_next_start_uses(dist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)}
    proc = subprocess.Popen([str(dist / "mobility-bootstrap"), "--version"], stdout=subprocess.DEVNULL, env=env)
    try:
        wait_for(
            "the unpack to begin",
            lambda: cache.is_dir() and any(cache.glob(".*.tmp")),
            timeout=30,
            every=0.005,
            most=0.005,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    left = [p.name for p in cache.iterdir()]
    assert left and all(name.startswith(".") and name.endswith(".tmp") for name in left), left  # never an entry
    r = _bootstrapper(dist, cache, "--version")
    assert (r.returncode, r.stdout.strip()) == (0, "mobility-bootstrap 0.1.0"), r.stderr
    ident = json.loads((dist / "build-info.json").read_text())["bootstrap_cache_id"]
    assert [p.name for p in cache.iterdir()] == [ident]  # the killed start's directory is gone
