"""A lab of real SSH hosts for push-install tests and benchmarks (needs root).

Each host is a Debian 12 booted with real systemd (systemd-nspawn) in its own network namespace, bridged to a hub
namespace where the configuration server and `mobility-server push` run (``lab.in_hub(argv)``). Roots are btrfs
snapshots of one base copy (cheap; btrfs can be frozen), or on request a full ext4 disk or an overlayfs (which
cannot be frozen). Every resource is recorded as it is created and `Lab.close()` undoes them in reverse, by PID,
device and exact name, also when set-up failed halfway::

    with Lab(tmp, sshd_base_root()) as lab:
        a = lab.add_host("a")
        lab.boot()
        subprocess.run(lab.in_hub(["ssh", "-i", str(lab.key), f"root@{a.address}", "true"]), check=True)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import asyncssh

REPO = Path(__file__).resolve().parent.parent

Disk = Literal["btrfs", "full", "overlay"]

BTRFS_IMAGE_SIZE = 16 << 30  # sparse: only what the hosts write takes space
FULL_IMAGE_SIZE = 1 << 30
FULL_FREE = 40 << 20  # what a "full" host keeps free: well below the 100 MB the push requires
STOP_TIMEOUT = 60.0
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_PER_HOST = 16  # measured: 8 (systemd 5, dbus-daemon, logind, getty); the rest for what tests start
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
log = logging.getLogger(__name__)
_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")

# Runs inside the hub namespace: prints each address whose port 22 answers with an SSH-2.0 banner.
_PROBE = """
import socket, sys
from concurrent.futures import ThreadPoolExecutor

def banner(address):
    try:
        with socket.create_connection((address, 22), timeout=3) as s:
            s.settimeout(3)
            return s.recv(256).startswith(b"SSH-2.0-")
    except OSError:
        return False

with ThreadPoolExecutor(len(sys.argv) - 1) as pool:
    for address, ok in zip(sys.argv[1:], pool.map(banner, sys.argv[1:])):
        if ok:
            print(address)
"""


class LabError(RuntimeError):
    """A lab command failed, a host did not boot in time, or clean-up left something behind."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60,
    stdin: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Every command the lab runs: bounded, output captured; a failure names the command, its code and stderr."""
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and r.returncode:
        raise LabError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def debian_root(name: str, *include: str, suite: str = "bookworm") -> Path:
    """A minimal Debian made with debootstrap (minbase, plus ``include``) of ``suite`` (bookworm: Debian 12,
    bullseye: Debian 11), cached between runs in .cache/. Concurrent callers (parallel test workers) wait for the
    one that makes it."""
    root = REPO / ".cache" / name
    root.parent.mkdir(exist_ok=True)
    lock = os.open(root.parent / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _debootstrap(root, include, suite)
    finally:
        os.close(lock)
    return root


def _debootstrap(root: Path, include: Sequence[str], suite: str) -> None:
    name = root.name
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        cmd = [
            "debootstrap",
            "--variant=minbase",
            *([f"--include={','.join(include)}"] if include else []),
            suite,
            str(root),
            "http://deb.debian.org/debian",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
        if r.returncode:
            raise LabError(f"debootstrap {name} ({suite}) failed: {r.stdout[-3000:]}{r.stderr[-3000:]}")
        (root / ".complete").write_text("")


SSHD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server")


def sshd_base_root(suite: str = "bookworm") -> Path:
    """The Debian that lab hosts and template containers copy: systemd as init, D-Bus and OpenSSH's sshd. Debian 12
    (bookworm) by default; ``suite="bullseye"`` is Debian 11 (glibc 2.31, older than the build host's)."""
    name = "debian12-sshd" if suite == "bookworm" else f"debian-{suite}-sshd"
    return debian_root(name, *SSHD_PACKAGES, suite=suite)


@dataclass
class Host:
    """One machine of the lab: its address in the hub's subnet, its namespace, its root and, once booted, its
    container (the systemd-nspawn process and the container's PID 1 as this machine sees it)."""

    name: str
    address: str
    netns: str
    root: Path
    disk: Disk
    host_key_public: str  # "ssh-ed25519 AAAA…", as in known_hosts after the address
    log: Path  # systemd-nspawn's output (the container's console)
    cgroups: tuple[Path, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    leader: int | None = None

    @property
    def known_hosts_line(self) -> str:
        return f"{self.address} {self.host_key_public}"


class Lab:
    """Hosts in network namespaces behind a hub namespace (bridge at ``<subnet>.1``, hosts from ``<subnet>.11``).
    A context manager; `close()` stops and removes everything it created.

    ``hub`` (namespace name), ``hub_address``, ``key`` (the client's private key file, ``key``.pub beside it),
    ``public_key`` (authorized for root and the extra users of every host) and ``hosts`` are for the caller."""

    _instances = itertools.count()

    def __init__(self, workdir: Path, base: Path, subnet: str = "10.213.0") -> None:
        self.workdir = workdir
        self.base = base
        self.subnet = subnet
        # The PID and a per-process counter keep concurrent and leftover labs' names apart.
        self.prefix = f"mbl{os.getpid()}-{next(Lab._instances)}"
        self.hub = f"{self.prefix}-hub"
        self.hub_address = f"{subnet}.1"
        self.hosts: list[Host] = []
        self.key = workdir / "id_ed25519"
        self.public_key = ""
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._btrfs: Path | None = None
        self._bases: dict[Path, str] = {}  # each base system's copy on the btrfs image (its subvolume)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            key = asyncssh.generate_private_key("ssh-ed25519", comment="mobility-testlab")
            _write(self.key, key.export_private_key(), 0o600)
            self.public_key = key.export_public_key().decode().strip()
            _write(self.key.with_name("id_ed25519.pub"), (self.public_key + "\n").encode(), 0o644)
            self._add_netns(self.hub)
            run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0"])
            run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def in_hub(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the hub namespace, where every host's address is reachable."""
        return ["ip", "netns", "exec", self.hub, *argv]

    def add_host(
        self,
        name: str,
        *,
        disk: Disk = "btrfs",
        users: Sequence[str] = (),
        root_password: str | None = None,
        sftp: bool = True,
        os_release: Path | None = None,
        base: Path | None = None,
    ) -> Host:
        """A host with its namespace and root, not booted: the caller may still change ``host.root``.

        ``disk``: "btrfs" (a snapshot of the lab's base copy), "full" (its own ext4, filled at boot to less than
        50 MiB free) or "overlay" (overlayfs over the base: cannot be frozen). ``users`` get a home and the lab
        key; ``root_password`` also allows root password logins; ``sftp=False`` leaves sshd without the SFTP
        subsystem; ``os_release`` replaces the release files (another OS); ``base`` is another system to copy than
        the lab's (e.g. ``sshd_base_root("bullseye")``: Debian 11)."""
        if not _NAME.fullmatch(name) or any(h.name == name for h in self.hosts):
            raise ValueError(f"host name {name!r} is not a new lower-case host name")
        index = len(self.hosts)
        if index > 200:
            raise ValueError("at most 201 hosts in one lab's subnet")
        netns = f"{self.prefix}-{name}"
        address = f"{self.subnet}.{11 + index}"
        self._add_netns(netns)
        # Both ends are created inside the namespaces: nothing appears in the caller's namespace.
        veth = f"v{index}"
        run(["ip", "-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        self._undo.append((f"veth {veth}", functools.partial(run, ["ip", "-n", self.hub, "link", "del", veth])))
        run(["ip", "-n", self.hub, "link", "set", veth, "master", "br0", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])

        root = self._make_root(name, disk, base or self.base)
        host = Host(name, address, netns, root, disk, "", self.workdir / f"{name}.log")
        self.hosts.append(host)
        host.host_key_public = _prepare_root(root, name, self.public_key)
        for user in users:
            self._add_user(root, user)
        if root_password is not None:
            run(["chroot", str(root), "chpasswd"], stdin=f"root:{root_password}\n")
            _write(
                root / "etc/ssh/sshd_config.d/testlab-password.conf",
                b"PermitRootLogin yes\nPasswordAuthentication yes\n",
                0o644,
            )
        if not sftp:
            config = root / "etc/ssh/sshd_config"
            lines = config.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not re.match(r"\s*Subsystem\s+sftp\b", line)]
            _write(config, "".join(kept).encode(), 0o644)
        if os_release is not None:
            text = os_release.read_bytes()
            for where in ("etc/os-release", "usr/lib/os-release"):
                _write(root / where, text, 0o644)
        return host

    def boot(self, hosts: Sequence[Host] | None = None, timeout: float = 180) -> None:
        """Boot every host not yet booted (or those of ``hosts``) in parallel; return once each one's sshd answers
        from the hub with an SSH banner. Raises LabError (the containers keep running until close()) if one
        exits or ``timeout`` passes first. Raises fs.inotify.max_user_instances if 128 + 16 per host is more."""
        todo = [h for h in (self.hosts if hosts is None else hosts) if h.proc is None]
        _raise_inotify_limit(sum(h.proc is not None for h in self.hosts) + len(todo))
        for host in todo:
            if host.disk == "full":
                _fill(host.root)
            host.cgroups = make_cgroups(f"{self.prefix}-{host.name}")
            self._undo.extend((f"cgroup {c}", functools.partial(remove_cgroup, c)) for c in host.cgroups)
            argv = in_cgroups(
                host.cgroups,
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--quiet",
                "--link-journal=no",
                "-D",
                str(host.root),
                f"--network-namespace-path=/run/netns/{host.netns}",
                # nspawn keys state in /run/systemd/nspawn by machine name: unique like the namespaces. The
                # container's systemd still names itself from /etc/hostname.
                f"--machine={host.netns}",
            )
            with host.log.open("ab") as out:
                host.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        deadline = time.monotonic() + timeout
        pending = {h.address: h for h in todo}
        while pending:
            for host in pending.values():
                if _running(host) is None:
                    raise LabError(f"{host.name}: systemd-nspawn exited during boot: {_tail(host.log)}")
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(h.name for h in pending.values())
                raise LabError(f"no SSH banner from {names} after {timeout:g} s; see the logs in {self.workdir}")
            probe = run(self.in_hub([sys.executable, "-S", "-c", _PROBE, *pending]), timeout=max(left, 10))
            for address in probe.stdout.split():
                pending.pop(address, None)
            if pending:
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        for host in todo:
            host.leader = _container_leader(host)

    def exec_in(self, host: Host, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` run inside the booted host (all its namespaces, its root), e.g. ``systemctl is-active mobility``;
        the result is returned whatever the exit code."""
        if _running(host) is None or host.leader is None:
            raise LabError(f"{host.name} is not running")
        namespaces = ["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup"]
        env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8"}
        return run(
            ["nsenter", f"--target={host.leader}", *namespaces, "--", *argv], timeout=timeout, check=False, env=env
        )

    def close(self) -> None:
        """Stop the containers (SIGTERM: systemd powers off; SIGKILL after a timeout), then undo everything else in
        reverse order of creation. Raises LabError naming whatever could not be undone."""
        try:
            errors = self._stop_containers()
        except Exception as e:  # unmounting what is left may still work
            errors = [f"stopping the containers: {e}"]
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # go on: one leftover must not leave all the others behind
                errors.append(f"{what}: {e}")
        if errors:
            raise LabError("lab clean-up incomplete: " + "; ".join(errors))

    def _add_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._undo.append((f"netns {name}", functools.partial(run, ["ip", "netns", "del", name])))
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _attach(self, image: Path) -> str:
        """A loop device for ``image`` (detached on close, then the image deleted)."""
        self._undo.append((f"image {image}", functools.partial(image.unlink, missing_ok=True)))
        device = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
        self._undo.append((f"loop device {device}", functools.partial(run, ["losetup", "-d", device])))
        return device

    def _mount(self, argv: Sequence[str], where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        run(["mount", *argv, str(where)])
        self._undo.append((f"mount {where}", functools.partial(_unmount, where)))

    def _make_root(self, name: str, disk: Disk, base: Path) -> Path:
        if disk == "btrfs":
            if self._btrfs is None:
                image = self.workdir / "btrfs.img"
                _sparse(image, BTRFS_IMAGE_SIZE)
                run(["mkfs.btrfs", "-q", str(image)], timeout=120)
                mount = self.workdir / "btrfs"
                self._mount([self._attach(image)], mount)
                self._btrfs = mount
            if base not in self._bases:
                copy = "base" if not self._bases else f"base-{len(self._bases)}"
                run(["btrfs", "subvolume", "create", str(self._btrfs / copy)])
                _copy_tree(base, self._btrfs / copy)
                self._bases[base] = copy  # only a complete copy is ever snapshotted
            root = self._btrfs / name
            run(["btrfs", "subvolume", "snapshot", str(self._btrfs / self._bases[base]), str(root)])
        elif disk == "full":
            image = self.workdir / f"{name}.img"
            _sparse(image, FULL_IMAGE_SIZE)
            run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], timeout=120)
            root = self.workdir / name
            self._mount([self._attach(image)], root)
            _copy_tree(base, root)
        elif disk == "overlay":
            layers = self.workdir / f"{name}-overlay"
            if any(c in f"{base}{layers}" for c in ",:"):
                raise LabError(f"overlayfs cannot take {base} or {layers} (',' or ':')")
            (layers / "upper").mkdir(parents=True)
            (layers / "work").mkdir()
            options = f"lowerdir={base},upperdir={layers / 'upper'},workdir={layers / 'work'}"
            root = self.workdir / name
            self._mount(["-t", "overlay", "overlay", "-o", options], root)
        else:
            raise ValueError(f"unknown disk kind {disk!r}")
        (root / ".complete").unlink(missing_ok=True)  # debian_root's cache marker
        return root

    def _add_user(self, root: Path, user: str) -> None:
        groups = [line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()]
        # Debian has system groups named like users one may want ("operator"): then the user joins "users".
        own_group = ["-N"] if user in groups else []
        run(["chroot", str(root), "useradd", "-m", "-s", "/bin/bash", *own_group, user])
        entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.split(":")[0] == user)
        uid, gid = int(entry.split(":")[2]), int(entry.split(":")[3])
        ssh = root / "home" / user / ".ssh"
        ssh.mkdir(mode=0o700)
        _write(ssh / "authorized_keys", (self.public_key + "\n").encode(), 0o600)
        for path in (ssh, ssh / "authorized_keys"):
            os.chown(path, uid, gid)

    def _stop_containers(self) -> list[str]:
        running = [(h, proc) for h in self.hosts if (proc := _running(h)) is not None]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
        deadline = time.monotonic() + STOP_TIMEOUT
        errors = []
        for host, proc in running:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                # Killing nspawn alone would orphan the container: kill its PID 1, which ends its PID namespace.
                leader = host.leader or _container_leader(host)
                if leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    errors.append(f"{host.name}: systemd-nspawn {proc.pid} did not exit")
        return errors


def _write(path: Path, data: bytes, mode: int) -> None:
    """A new file with ``mode`` from the start; an existing one (or a symlink into the host) is replaced, never
    followed."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode went through the umask


def _sparse(path: Path, size: int) -> None:
    with path.open("xb") as f:
        f.truncate(size)


def _copy_tree(source: Path, dest: Path) -> None:
    run(["cp", "-a", f"{source}/.", str(dest)], timeout=600)


def _unmount(where: Path) -> None:
    if run(["umount", str(where)], check=False).returncode:
        run(["umount", "--lazy", str(where)])  # still busy: detached now, freed when the last user goes


def make_cgroups(name: str) -> tuple[Path, ...]:
    """A cgroup ``name`` below this process's own, in the unified hierarchy and (hybrid set-ups) the name=systemd
    one; the caller removes them (`remove_cgroup`). systemd-nspawn --keep-unit puts a container under the cgroup it
    starts in, so each container needs one of its own: otherwise their systemds would all manage one shared
    "payload" cgroup."""
    made: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                mount = Path("/sys/fs/cgroup/unified")
                if not (mount / "cgroup.procs").exists():
                    mount = Path("/sys/fs/cgroup")
            elif controllers == "name=systemd":
                mount = Path("/sys/fs/cgroup/systemd")
            else:
                continue
            cgroup = mount / path.lstrip("/") / name
            cgroup.mkdir()
            made.append(cgroup)
    except BaseException:
        for cgroup in made:
            remove_cgroup(cgroup)
        raise
    return tuple(made)


def in_cgroups(cgroups: Sequence[Path], *argv: str) -> list[str]:
    """``argv`` started inside ``cgroups`` (a shell moves itself there, then execs it: the PID stays)."""
    enter = " && ".join(f'echo $$ > "${i + 1}/cgroup.procs"' for i in range(len(cgroups)))
    return ["/bin/sh", "-c", f'{enter} && shift {len(cgroups)} && exec "$@"', "sh", *map(str, cgroups), *argv]


def remove_cgroup(cgroup: Path) -> None:
    """Remove ``cgroup`` and what nspawn and the container's systemd left inside it (deepest first)."""
    if not cgroup.exists():
        return
    for below, _, _ in sorted(os.walk(cgroup), key=lambda entry: -len(entry[0])):
        os.rmdir(below)


def _prepare_root(root: Path, name: str, public_key: str) -> str:
    """Make a copy of the base a machine of its own: host key, machine-id, hostname, root's authorized key, a
    persistent journal. Returns the new host key's public line."""
    etc = root / "etc"
    for old in (etc / "ssh").glob("ssh_host_*"):
        old.unlink()
    key = asyncssh.generate_private_key("ssh-ed25519")
    _write(etc / "ssh/ssh_host_ed25519_key", key.export_private_key(), 0o600)
    host_key_public = key.export_public_key().decode().strip()
    _write(etc / "ssh/ssh_host_ed25519_key.pub", (host_key_public + "\n").encode(), 0o644)
    _write(etc / "ssh/sshd_config.d/testlab.conf", b"HostKey /etc/ssh/ssh_host_ed25519_key\n", 0o644)
    _write(etc / "machine-id", (secrets.token_hex(16) + "\n").encode(), 0o444)
    _write(etc / "hostname", f"{name}\n".encode(), 0o644)
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh, 0o700)
    _write(ssh / "authorized_keys", (public_key + "\n").encode(), 0o600)
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    return host_key_public


def _raise_inotify_limit(hosts: int) -> None:
    """Each container's systemd, D-Bus and logind hold inotify instances, all charged to root: 16 hosts use up the
    usual limit of 128 and starve every root process on the machine. Raised when too low, never lowered (other labs
    may be running)."""
    need = 128 + INOTIFY_PER_HOST * hosts
    current = int(INOTIFY_LIMIT.read_text())
    if current < need:
        log.warning("raising fs.inotify.max_user_instances from %d to %d for %d containers", current, need, hosts)
        INOTIFY_LIMIT.write_text(f"{need}\n")


def _fill(root: Path) -> None:
    """Leave less than FULL_FREE on ``root``'s filesystem: a real full disk."""
    st = os.statvfs(root)
    excess = st.f_bavail * st.f_frsize - FULL_FREE
    if excess > 0:
        run(["fallocate", "-l", str(excess), str(root / "var/lib/testlab-filler")])


def _container_leader(host: Host) -> int | None:
    """The container's PID 1 as seen from here: the child of systemd-nspawn in another PID namespace."""
    if host.proc is None:
        return None
    own = os.readlink("/proc/self/ns/pid")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == host.proc.pid and os.readlink(stat.parent / "ns/pid") != own:
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return None


def _running(host: Host) -> subprocess.Popen[bytes] | None:
    return host.proc if host.proc is not None and host.proc.poll() is None else None


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as e:
        return str(e)
