"""A fleet of sandbox machines for the self-update tests and benchmark: each a root (real Debian 12 release files, its
own machine-id) that the frozen bootstrapper installs and registers against a real server, with its daemon running
on this host as `mobility run --root ROOT` (no init system: the daemon re-executes itself into a new version, and
the upgrade watcher tends it). Every process a machine starts (its daemon, its watchers, the daemons they start)
runs in the machine's own cgroup, which `stop()` kills as a whole: nothing outlives a test, found by PID, never by
name."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import DISTROS, REPO
from tests.integration.serverproc import ServerProcess, server_cli, start_server

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
_COUNTER = itertools.count()


class Cgroup:
    """A cgroup v2 of this test run; every process started in it (and its descendants) is killed by `kill()`."""

    def __init__(self, name: str) -> None:
        base = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.procs").exists() else Path("/sys/fs/cgroup")
        self.path = base / f"mobility-test-{os.getpid()}-{next(_COUNTER)}-{name}"
        self.path.mkdir()

    def enter(self) -> None:
        """In the child, before exec (preexec_fn): move this process into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        if not self.path.exists():
            return
        if (self.path / "cgroup.kill").exists():
            (self.path / "cgroup.kill").write_text("1")
        else:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def bundle_of(releases: Mapping[str, Path], version: str, tag: str = "DEBIAN12") -> Path:
    """The bundle of ``version`` for ``tag`` among the builds (the ``releases`` fixture)."""
    (found,) = releases[version].glob(f"Mobility_UA_{version}_{tag}-64_*.tar.gz")
    return found


def unpack_bundle(bundle: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(where, filter="tar")
    return where


@dataclass
class Machine:
    """One sandbox machine: its root, its cgroup, and the daemon the test started (if it still is that process)."""

    name: str
    root: Path
    cgroup: Cgroup
    daemon: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def install_dir(self) -> Path:
        return self.root / "usr/local/mobility"

    def state(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.root / "var/lib/mobility" / name).read_text()))
        except (OSError, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        return self.state("daemon.json")

    def record(self) -> dict[str, Any]:
        return self.state("update.json")

    def host_id(self) -> str:
        return str(self.state("identity.json").get("host_id"))

    def current(self) -> str:
        link = self.install_dir / "current"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else ""

    def versions(self) -> set[str]:
        return {p.name for p in (self.install_dir / "versions").iterdir()}

    def running(self) -> str | None:
        """The version of the daemon that runs now, by its own record and a live PID."""
        status = self.status()
        pid = status.get("pid")
        if not isinstance(pid, int) or pid not in self.cgroup.pids():
            return None
        return str(status.get("version"))

    def log(self, name: str = "install.log") -> str:
        path = self.root / "var/log/mobility" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, program: list[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        """Start the daemon (as a boot would: the launcher `current` names), in the machine's cgroup."""
        argv = program or [str(self.install_dir / "current/mobility/mobility")]
        self.daemon = subprocess.Popen(
            [*argv, "run", "--root", str(self.root)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(env or self.env or os.environ),
            preexec_fn=self.cgroup.enter,  # noqa: PLW1509 - into the cgroup before exec: none escapes
        )

    def power_cut(self) -> None:
        """Every process of the machine killed at once (kill -9), as a power cut would."""
        if self.cgroup.path.exists() and (self.cgroup.path / "cgroup.kill").exists():
            (self.cgroup.path / "cgroup.kill").write_text("1")
        else:
            for pid in self.cgroup.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.daemon is not None:
            self.daemon.poll()

    def stop(self) -> None:
        self.cgroup.kill()
        if self.daemon is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=10)


def make_machine(
    where: Path,
    name: str,
    bootstrapper: Path,
    server_address: str,
    fingerprint: str,
    passphrase: str,
    conf: Mapping[str, object],
    cache: Path,
) -> Machine:
    """A root baked as a template would be, bootstrapped by the frozen bootstrapper (install, register, report)."""
    root = where / name
    shutil.copytree(DISTROS / "debian12", root, symlinks=True)
    (root / "etc/machine-id").write_text(os.urandom(16).hex() + "\n")
    (root / "etc/hostname").write_text(f"{name}\n")
    etc = root / "etc/mobility"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passphrase").write_text(passphrase + "\n")
    (etc / "passphrase").chmod(0o600)
    (etc / "bootstrap.conf").write_text(
        f"server = {server_address}\nfingerprint = {fingerprint}\npassphrase_file = /etc/mobility/passphrase\n"
        "retry_for = 30\n"
    )
    (etc / "mobility.conf").write_text(json.dumps(dict(conf)))
    r = subprocess.run(
        [str(bootstrapper), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)},
    )
    if r.returncode:
        raise AssertionError(f"bootstrap of {name} failed: {r.stdout}{r.stderr}")
    return Machine(name, root, Cgroup(name))


class Lab:
    """A server and sandbox machines bootstrapped from the 0.1.0 bootstrapper, with the agent settings ``conf``."""

    def __init__(
        self, tmp: Path, releases: Mapping[str, Path], conf: Mapping[str, object], heartbeat: float = 1.0
    ) -> None:
        self.tmp, self.releases, self.conf = tmp, releases, conf
        self.server: ServerProcess = start_server(tmp / "data", heartbeat_interval=heartbeat)
        self.machines: list[Machine] = []
        self.publish("0.1.0")

    def publish(self, version: str, tag: str = "DEBIAN12") -> None:
        server_cli(self.server.data, "repo", "add", str(bundle_of(self.releases, version, tag)), check=True)

    def add(self, count: int) -> list[Machine]:
        base = len(self.machines)
        with ThreadPoolExecutor(4) as pool:
            made = list(
                pool.map(
                    lambda i: make_machine(
                        self.tmp / "machines",
                        f"m{base + i + 1}",
                        self.releases["0.1.0"] / "mobility-bootstrap",
                        self.server.address,
                        self.server.fingerprint,
                        self.server.passphrase(),
                        self.conf,
                        self.tmp / "bootstrap-cache",
                    ),
                    range(count),
                )
            )
        self.machines += made
        return made

    def cli(self, *args: str) -> Any:
        r = server_cli(self.server.data, *args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def rollout(self) -> dict[str, Any]:
        return dict(self.cli("updates")[0])

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["host_id"]: m for m in self.rollout()["machines"]}

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {str(j["job_id"]): j for j in self.server.jobs()}

    def close(self) -> None:
        for m in self.machines:
            m.stop()
        self.server.stop()
