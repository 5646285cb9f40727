"""A replication lab for tests and benchmarks: a real server (API + process server) on loopback, registered source
machines as sandbox roots, loop-device disks with real filesystems (exposed inside a root as a device node, as a
chroot would see them), real `mobility run` daemons. Everything it makes is undone by ``close`` (processes by
PID, mounts, loop devices, device nodes), in reverse order, whatever failed in between."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts import polling
from scripts.localserver import configure_agent, init_local_server, process_port, start_local_server

REPO = Path(__file__).resolve().parent.parent
DISTROS = REPO / "tests" / "resources" / "distros"


def sh(argv: Sequence[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-1000:]}")
    return r


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """scripts/polling.wait_for with the lab's longer default: disks sync and points are cut in tens of seconds."""
    return polling.wait_for(what, condition, timeout, every)


@dataclass
class Server:
    data: Path
    proc: subprocess.Popen[str]
    address: str
    fingerprint: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def process_port(self) -> int:
        port = process_port(self.data)
        if port is None:
            raise RuntimeError("the server runs no process server role")
        return port

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "server", *args, "--data", str(self.data)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"mobility-server {' '.join(args)}: {r.stdout[-1000:]} {r.stderr[-2000:]}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)


@dataclass
class Disk:
    image: Path
    loop: str  # /dev/loopN
    major: int
    minor: int
    mounts: list[Path] = field(default_factory=list)
    fstypes: list[str] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)  # device nodes of its partitions (made here: no udev)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) in bytes of each filesystem

    @property
    def name(self) -> str:
        return self.loop


@dataclass
class Machine:
    root: Path
    host_id: str
    agent: subprocess.Popen[str] | None = None
    agent_started: float = 0.0  # wall clock: a status written before it is the last agent's

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/mobility"

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir / "replication" / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    def disk_state(self, disk: Disk) -> dict[str, Any]:
        return next((d for d in self.status().get("disks", []) if d["disk"] == disk.loop), {})

    def agent_cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--root", str(self.root)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    def point(self, timeout: float = 300) -> dict[str, Any]:
        r = self.agent_cli("point", "--json", "--timeout", str(timeout), timeout=timeout + 30)
        if r.returncode != 0:
            raise RuntimeError(f"mobility point failed: {r.stdout} {r.stderr}")
        return dict(json.loads(r.stdout))

    def log(self) -> str:
        path = self.root / "var/log/mobility/agent.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._shared = False

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def defer(self, what: str, action: Callable[[], object]) -> None:
        self._undo.append((what, action))

    def close(self) -> None:
        errors = []
        while self._undo:
            what, action = self._undo.pop()
            try:
                action()
            except Exception as e:  # keep undoing the rest
                errors.append(f"{what}: {e}")
        if errors:
            raise RuntimeError("lab cleanup: " + "; ".join(errors))

    # Servers ----------------------------------------------------------------------------------------------------

    def server(
        self,
        name: str = "server",
        *args: str,
        heartbeat: float = 1.0,
        wrap: Sequence[str] = (),
        host: str = "127.0.0.1",
        data: Path | None = None,
        database: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        """A server (API + process server) on ``database`` (a PostgreSQL URL; default its own SQLite file); ``env``:
        its whole environment (e.g. with a fault plan of the suite's)."""
        data = data or self.workdir / name
        if not (data / ".initialised").exists():
            init_local_server(data, host, database)
        proc, address, fingerprint = start_local_server(
            data, "--heartbeat-interval", str(heartbeat), "--store-reserve", "32M", *args, host=host, wrap=wrap, env=env
        )
        server = Server(data, proc, address, fingerprint)
        self.defer(f"server {name}", lambda: stop(proc))
        return server

    def restart(
        self, server: Server, *args: str, heartbeat: float = 1.0, wrap: Sequence[str] = (), host: str = "127.0.0.1"
    ) -> None:
        stop(server.proc)
        port = server.port
        if "--process-listen" not in args:
            # Without it, a server on a fixed --listen port takes the process server's default port (9444), which
            # another server on this machine may hold: a free one, as at the first start (the agents move to it).
            args = (*args, "--process-listen", f"{host}:0")
        proc, address, _ = start_local_server(
            server.data,
            "--heartbeat-interval",
            str(heartbeat),
            "--store-reserve",
            "32M",
            *args,
            port=port,
            host=host,
            wrap=wrap,
        )
        server.proc, server.address = proc, address
        self.defer("restarted server", lambda: stop(proc))

    # Disks ------------------------------------------------------------------------------------------------------

    def disk(
        self,
        name: str,
        size: int,
        fs: Sequence[str] = ("ext4",),
        *,
        partitioned: bool = False,
        fill: Callable[[Path], None] | None = None,
    ) -> Disk:
        """A loop device of ``size`` bytes over a sparse file; one filesystem per entry of ``fs`` (in partitions
        when ``partitioned``, else one on the whole disk; none for ``()``), mounted under the lab."""
        image = self.workdir / f"{name}.img"
        with image.open("wb") as f:
            f.truncate(size)
        if partitioned:
            share = 100 // max(len(fs), 1)
            table = "label: gpt\n" + "".join(f",{share}%\n" if i < len(fs) - 1 else ",\n" for i in range(len(fs)))
            sh(["sfdisk", "-q", str(image)], input=table)
        loop = sh(["losetup", "--find", "--show", "--direct-io=off", str(image)]).stdout.strip()
        self.defer(f"loop {loop}", lambda: detach(loop, image))
        st = os.stat(loop)
        disk = Disk(image, loop, os.major(st.st_rdev), os.minor(st.st_rdev))
        targets = [loop]
        if partitioned:
            sh(["partx", "--add", loop])
            self.defer(f"partitions of {loop}", lambda: sh(["partx", "--delete", loop], check=False))
            kname = Path(loop).name
            for part in sorted(Path(f"/sys/block/{kname}").glob(f"{kname}p*")):
                node = self.workdir / part.name
                major, minor = (int(x) for x in (part / "dev").read_text().split(":"))
                if not node.exists():
                    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
                    self.defer(f"node {node}", lambda node=node: node.unlink(missing_ok=True))  # type: ignore[misc]
                disk.partitions.append(str(node))
                start, count = (int((part / name).read_text()) for name in ("start", "size"))
                disk.ranges.append((start * 512, count * 512))
            targets = disk.partitions
        else:
            disk.ranges.append((0, size))
        if fs:
            self._share_workdir()
        for i, (target, kind) in enumerate(zip(targets, fs, strict=False)):
            sh([f"mkfs.{kind}", *(["-q"] if kind.startswith("ext") else ["-q", "-f"]), target])
            where = self.workdir / f"{name}-mnt{i}"
            where.mkdir(exist_ok=True)
            sh(["mount", target, str(where)])
            self.defer(f"mount {where}", lambda where=where: umount(where))  # type: ignore[misc]
            disk.mounts.append(where)
            disk.fstypes.append(kind)
        if fill is not None:
            for where in disk.mounts:
                fill(where)
            sh(["sync"])
        return disk

    def _share_workdir(self) -> None:
        """Make the lab's directory a shared mount of its own, once, before the first filesystem is mounted in it.
        A mount namespace made while a lab filesystem is mounted (``ip netns exec``, ``systemd-nspawn``: other tests
        on this machine) holds a copy of that mount; this machine's mounts are private, so unmounting it here would
        leave the filesystem alive there, written back and closed whenever that namespace lets go (after a point that
        took the disk for idle). Those namespaces are slaves of ours: under a shared parent, the unmount reaches
        them."""
        if self._shared:
            return
        sh(["mount", "--rbind", str(self.workdir), str(self.workdir)])  # with what is mounted in it already
        # Last of what is mounted in it (the lab's own filesystems went before): whatever is left goes with it.
        unbind = ["umount", "--recursive", "--lazy", str(self.workdir)]
        self.defer(f"bind mount {self.workdir}", lambda: sh(unbind, check=False))
        sh(["mount", "--make-shared", str(self.workdir)])
        self._shared = True

    # Machines ---------------------------------------------------------------------------------------------------

    def machine(self, server: Server, name: str = "m1", config: dict[str, Any] | None = None) -> Machine:
        root = self.workdir / name
        shutil.copytree(DISTROS / "debian12", root, symlinks=True)
        (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
        (root / "etc" / "hostname").write_text(f"{name}\n")
        secret = self.workdir / f"{name}.pass"
        secret.write_text(server.cli("passphrase", "show").stdout.strip() + "\n")
        secret.chmod(0o600)
        r = configure_agent(root, server.address, secret, server.fingerprint)
        if r.returncode != 0:
            raise RuntimeError(f"configure failed: {r.stdout} {r.stderr}")
        host_id = str(json.loads(r.stdout)["host_id"])
        from agent.host.paths import Paths
        from agent.replication.tracing import TRACEFS, instance_name, remove_instance

        instance = TRACEFS / "instances" / instance_name(Paths(root.resolve()).state_dir)
        self.defer(f"tracing instance of {name}", lambda: remove_instance(instance))  # a killed agent's
        conf = {"health_seconds": 5, **(config or {})}
        (root / "etc/mobility").mkdir(parents=True, exist_ok=True)
        (root / "etc/mobility/mobility.conf").write_text(json.dumps(conf))
        return Machine(root, host_id)

    def expose(self, machine: Machine, disk: Disk) -> None:
        """The disk's device node inside the machine's root, where the agent resolves /dev/loopN."""
        node = machine.root / disk.loop.lstrip("/")
        node.parent.mkdir(parents=True, exist_ok=True)
        if not node.exists():
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(disk.major, disk.minor))

    def start_agent(self, machine: Machine, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`mobility run` for ``machine`` (``env``: its whole environment, e.g. with a fault plan of the suite's)."""
        log = (self.workdir / f"{machine.root.name}-agent.out").open("a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--root", str(machine.root)],
            cwd=REPO,
            text=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        machine.agent, machine.agent_started = proc, time.time()
        self.defer(f"agent {proc.pid}", lambda: stop(proc))
        return proc

    def wait_state(
        self, machine: Machine, disk: Disk, state: str, timeout: float = 120, *, settled: bool = True
    ) -> dict[str, Any]:
        """The disk in ``state`` as the running agent reports it (a status the last agent wrote at its stop or its
        kill does not count); CONTINUOUS ``settled`` also has nothing left to send (never true under a writer that
        outpaces replication on a loaded machine: pass ``settled=False`` there)."""

        def ready() -> dict[str, Any] | None:
            if machine.status().get("updated", 0) < machine.agent_started:
                return None
            d = machine.disk_state(disk)
            if machine.agent is not None and machine.agent.poll() is not None:
                raise AssertionError(f"the agent exited {machine.agent.returncode}: {machine.log()[-3000:]}")
            done = state != "CONTINUOUS" or not settled or d.get("bytes_left", 1) == 0
            return d if d.get("state") == state and done else None

        try:
            return dict(wait_for(f"{disk.loop} in {state}", ready, timeout))
        except AssertionError as e:
            raise AssertionError(f"{e}; last: {machine.disk_state(disk)}; log: {machine.log()[-3000:]}") from None


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def umount(where: Path, *, ended: bool = False, timeout: float = 30.0) -> None:
    """Unmount ``where``. With ``ended``, also wait until its filesystem has ended (its block device is no longer
    claimed): a mount namespace that still holds a private copy of the mount keeps the filesystem alive, and it
    writes to the disk again when that namespace lets go. A disk that must be idle (a replica compared with it) is
    not, then: RuntimeError naming the processes that hold it."""
    source = _mount_source(where) if ended else None
    for _ in range(20):
        r = sh(["umount", str(where)], check=False)
        if r.returncode == 0 or "not mounted" in r.stderr:
            break
        time.sleep(0.5)
    else:
        sh(["umount", "-l", str(where)], check=False)
    if source is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(os.open(source, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))  # EBUSY while a filesystem holds it
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        if time.monotonic() > deadline:
            holders = _mount_holders(source)
            raise RuntimeError(
                f"{source} is still in use {timeout:g} s after {where} was unmounted: its filesystem lives on in "
                f"another mount namespace (processes {holders or 'unknown'}), and writes to the disk when that ends"
            )
        time.sleep(0.2)


def _mount_source(where: Path) -> str | None:
    """The block device mounted at ``where`` (from this process's mount table), or None."""
    target = os.path.realpath(where)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target and " - " in line:
            source = line.split(" - ", 1)[1].split()[1]
            return source if os.path.exists(source) and stat.S_ISBLK(os.stat(source).st_mode) else None
    return None


def _mount_holders(source: str) -> list[int]:
    """Processes whose mount table still mounts ``source`` (one per mount namespace is enough to name it)."""
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ns = os.readlink(proc / "ns" / "mnt")
            if ns not in found and f" {source} " in (proc / "mountinfo").read_text():
                found[ns] = int(proc.name)
        except OSError:
            continue
    return sorted(found.values())


def _openers(device: str) -> list[str]:
    """Processes with ``device`` open (pid and command name), for an error that says who keeps it."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == device for fd in (proc / "fd").iterdir()):
                found.append(f"{proc.name} ({(proc / 'comm').read_text().strip()})")
        except OSError:
            continue
    return found


def detach(loop: str, image: Path, timeout: float = 30.0) -> None:
    """Detach ``loop`` and see it gone. The kernel only marks a device still open for detaching at its last close
    (a filesystem of it that outlives its unmount, such as a copy of the mount in another mount namespace, keeps it),
    so the detach is asked again while the device still has ``image`` behind it (never once another file is: the
    number may already be someone else's); RuntimeError if it still has after ``timeout`` seconds, rather than
    leaving it silently."""
    backing = Path("/sys/block") / Path(loop).name / "loop" / "backing_file"
    ours = str(image.resolve())
    deadline = time.monotonic() + timeout
    while True:
        try:
            if backing.read_text().strip() != ours:
                return
        except OSError:  # no longer a bound loop device
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{loop} is still attached to {ours} (open elsewhere: `losetup --detach {loop}` then); mounted in the "
                f"mount namespaces of processes {_mount_holders(loop) or 'none'}, open by processes "
                f"{_openers(loop) or 'none'}"
            )
        sh(["losetup", "--detach", loop], check=False)
        time.sleep(0.2)


def read_disk(path: str | Path, size: int) -> bytes:
    """The disk's bytes as they are on the device (O_DIRECT past any cache)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        out = bytearray()
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                break
            out += buf[: min(n, size - offset)]
            offset += n
        return bytes(out)
    finally:
        os.close(fd)
