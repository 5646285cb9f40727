"""A fleet of sandbox machines for the self-update tests and benchmark: each a root (real Debian 12 release files, its
own machine-id) that the frozen bootstrapper installs and registers against a real server, with its daemon running
on this host as `mobility run --root ROOT` (no init system: the daemon re-executes itself into a new version, and
the upgrade watcher tends it). Every process a machine starts (its daemon, its watchers, the daemons they start)
runs in the machine's own cgroup, which `stop()` kills as a whole: nothing outlives a test, found by PID, never by
name.

The environment the tests put the machines through: a process server of its own that can be stopped (SIGSTOP: it
stalls) while the API answers, a protected loop-device disk per machine, and a wall clock each machine's processes
read through a preloaded shim (tests/integration/clockstep.c), stepped by a file the test writes (the host's clock,
which other jobs share, is never touched; the monotonic clock is left alone, as a real clock step leaves it)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.localserver import start_local_server
from tests.conftest import DISTROS, REPO
from tests.integration.serverproc import ServerProcess, init_server, server_cli, start_server

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
_COUNTER = itertools.count()
CLOCK_SHIM = REPO / "tests" / "integration" / "clockstep.c"


def clock_shim() -> Path:
    """tests/integration/clockstep.c built (once per run, shared by the workers): preloaded, it steps a process's
    wall clock by the seconds a file says."""
    from tests import workers

    def build(where: Path) -> None:
        cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wno-nonnull-compare", "-o", str(where / "clockstep.so")]
        subprocess.run([*cmd, str(CLOCK_SHIM), "-ldl"], check=True, timeout=120, capture_output=True)

    return workers.once("clockstep", build) / "clockstep.so"


def stepped_clock(offset_file: Path) -> dict[str, str]:
    """os.environ for a machine's processes whose wall clock is off by the seconds ``offset_file`` holds ("300":
    five minutes ahead), read again every second; their children (the watcher, the new version's daemon) inherit
    it. The monotonic clock and sleeps are left alone, as a real clock step leaves them."""
    offset_file.write_text("0\n")
    return {**os.environ, "LD_PRELOAD": str(clock_shim()), "MOBILITY_TEST_CLOCK": str(offset_file)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def repacked(bundle: Path, dest_dir: Path, **manifest: object) -> Path:
    """A copy of ``bundle`` (same name) whose bundle.json says ``manifest`` too, e.g. state_format=2: the same frozen
    programs declared as a version that writes a newer agent state. Every other member is copied as it is."""
    import gzip
    import io

    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / bundle.name
    with (
        tarfile.open(bundle) as src,
        gzip.open(dest, "wb") as gz,
        tarfile.open(fileobj=gz, mode="w", format=src.format) as out,
    ):
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            if member.name.lstrip("./") == "bundle.json" and data is not None:
                doc = json.loads(data.read())
                doc.update(manifest)
                raw = json.dumps(doc, indent=2, sort_keys=True).encode()
                member.size = len(raw)
                out.addfile(member, io.BytesIO(raw))
            else:
                out.addfile(member, data)
    return dest


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

    def watchers(self) -> list[int]:
        """The upgrade watchers running for this machine (`mobility upgrade`, by their command lines)."""
        found = []
        for pid in self.cgroup.pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"upgrade" in argv:
                found.append(pid)
        return found

    def health_of(self, check: str) -> str | None:
        """The status of ``check`` in the daemon's last report."""
        for c in (self.status().get("health") or {}).get("checks", []):
            if c.get("id") == check:
                return str(c.get("status"))
        return None

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
        self,
        tmp: Path,
        releases: Mapping[str, Path],
        conf: Mapping[str, object],
        heartbeat: float = 1.0,
        *,
        process_apart: bool = False,
    ) -> None:
        """``process_apart``: the API and the process server in two processes (`serve --role api|process`), so
        that the process server can stop while the configuration server answers."""
        self.tmp, self.releases, self.conf = tmp, releases, conf
        self.process: ServerProcess | None = None
        self.machines: list[Machine] = []
        self._loops: list[str] = []
        if process_apart:
            self.server, self.process = self._apart(tmp / "data", heartbeat)
        else:
            self.server = start_server(tmp / "data", heartbeat_interval=heartbeat)
        self.publish("0.1.0")

    @staticmethod
    def _apart(data: Path, heartbeat: float) -> tuple[ServerProcess, ServerProcess]:
        init_server(data)
        port = free_port()
        beat = ("--heartbeat-interval", str(heartbeat))
        api, address, fingerprint = start_local_server(
            data, *beat, "--role", "api", "--process-address", f"127.0.0.1:{port}"
        )
        process, paddress, _ = start_local_server(
            data, *beat, "--role", "process", "--process-listen", f"127.0.0.1:{port}", "--store-reserve", "32M"
        )
        return (
            ServerProcess(data, api, int(address.rsplit(":", 1)[1]), fingerprint),
            ServerProcess(data, process, int(paddress.rsplit(":", 1)[1]), fingerprint),
        )

    def protect(self, m: Machine, size: int = 32 << 20) -> str:
        """A loop-device disk of ``size`` (sparse, zeros), its node inside the machine's root, protected by the
        server under a policy with no points to cut meanwhile; returns its /dev path."""
        image = self.tmp / f"{m.name}-disk.img"
        with image.open("wb") as f:
            f.truncate(size)
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        self._loops.append(loop)
        st = os.stat(loop)
        node = m.root / loop.lstrip("/")
        node.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(os.major(st.st_rdev), os.minor(st.st_rdev)))
        server_cli(self.server.data, "policy", "set", "calm", "--interval", "7d", "--retention", "10", check=True)
        r = server_cli(self.server.data, "protect", "--machine", m.host_id(), "--disk", loop, "--policy", "calm")
        assert r.returncode == 0, r.stderr
        return loop

    def publish(self, version: str, tag: str = "DEBIAN12") -> None:
        self.publish_file(bundle_of(self.releases, version, tag))

    def publish_file(self, bundle: Path) -> None:
        server_cli(self.server.data, "repo", "add", str(bundle), check=True)

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
        from agent.host.paths import Paths
        from agent.replication.tracing import remove_leftover

        for m in self.machines:
            m.stop()
            remove_leftover(Paths(m.root.resolve()).state_dir)  # a killed agent's tracing instance
        if self.process is not None:
            self.process.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
            self.process.stop()
        self.server.stop()
        for loop in self._loops:
            subprocess.run(["losetup", "--detach", loop], check=False, timeout=60)
