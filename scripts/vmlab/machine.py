"""One lab VM: QEMU booting a qcow2 overlay over an image or a template disk, with its own hardware identity (SMBIOS
UUID, MACs: what a hypervisor gives each clone), the serial console (scripts/vmlab/console.py), SSH through a
loopback-only host forward, the host's servers reachable only through `guestfwd` on a restricted user network (no
route anywhere else), and isolated segments between VMs.

Nothing outlives its owner: QEMU runs with a parent-death signal (SIGKILL when the thread that started it ends, a
test killed with -9 included) and in a session of its own; `close()` stops it by PID, removes its overlay and its
sockets, and gives back its slot. At most `MAX_VMS` VMs run on the machine at once, whoever started them: each holds
one of the machine-wide slot locks while it runs."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.vmlab.build import Image
from scripts.vmlab.console import CommandResult, Console
from scripts.vmlab.host import VmLabError, run, take_lock
from scripts.vmlab.recipe import BOOT_MARKER, GUEST_ADDRESS_OF_HOST, HOSTNAME_FW_CFG
from server.process.recovery_vm import MAX_VMS, SLOTS, accelerator

_MARKER = re.compile(BOOT_MARKER.encode() + rb" uptime=([0-9.]+) boot_id=([0-9a-f-]+)\r?\n")
# A CPU model for guests that encrypt and hash a lot under TCG (an agent replicating over TLS): QEMU's default with the
# AES-NI, PCLMULQDQ and SSE4 that TCG emulates well. Measured (openssl speed in the guest, QEMU 7.2): AES-256-GCM
# 10 -> 22 MB/s, and a protected VM's initial sync 255 -> 191 s; `-cpu max` adds AVX2, which TCG runs slower than the
# code it replaces (ChaCha20-Poly1305 80 -> 8.5 MB/s).
CRYPTO_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq"
QEMU = "qemu-system-x86_64"
STOP_TIMEOUT = 90.0
# The accelerator and the machine-wide VM slots are the product's (server/process/recovery_vm.py): the lab's VMs and
# the server's (test failovers, the appliance that inspects a point) count against the same MAX_VMS.


@dataclass(frozen=True)
class Hardware:
    """What a hypervisor gives one VM: an SMBIOS system UUID (the guest's DMI product_uuid) and a MAC per NIC. A
    clone gets new ones; booting the same machine again reuses them."""

    uuid: str
    macs: tuple[str, ...]

    @staticmethod
    def new(nics: int = 4) -> Hardware:
        return Hardware(str(uuid.uuid4()), tuple(_mac() for _ in range(nics)))


def _mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))  # QEMU's own OUI


@dataclass(frozen=True)
class Disk:
    """A disk a VM can boot: a file (raw image or qcow2), and the cached image its backing chain ends in (whose
    root accepts the lab's SSH key). ``fmt`` names the format of a file that is neither the image nor an overlay:
    a failover's raw images of a VM's disks."""

    path: Path
    image: Image
    fmt: str | None = None

    @staticmethod
    def of(image: Image) -> Disk:
        return Disk(image.disk, image)

    @property
    def format(self) -> str:
        if self.fmt is not None:
            return self.fmt
        return "raw" if self.path == self.image.disk else "qcow2"

    def overlay(self, dest: Path) -> Disk:
        """A new qcow2 over this disk (which must not change while the overlay exists: writes go to the overlay)."""
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.format, "-b", str(self.path), str(dest)])
        return Disk(dest, self.image)

    def keep_as(self, dest: Path) -> Disk:
        """A copy of this qcow2 overlay that nothing writes any more: a template whose clones overlay it."""
        if self.format != "qcow2":
            raise VmLabError(f"{self.path} is the image itself, not an overlay to keep")
        run(["cp", "--sparse=always", str(self.path), str(dest)], timeout=600)
        dest.chmod(0o444)
        return Disk(dest, self.image)


@dataclass(frozen=True)
class Forward:
    """A host port the guest reaches at ``GUEST_ADDRESS_OF_HOST:guest_port`` (and nothing else of the host's)."""

    host_port: int
    guest_port: int
    host: str = "127.0.0.1"

    def option(self) -> str:
        # cmd: a new socat per connection (a chardev target would serve one connection for the VM's whole life)
        return f"guestfwd=tcp:{GUEST_ADDRESS_OF_HOST}:{self.guest_port}-cmd:socat - TCP:{self.host}:{self.host_port}"


class Segment:
    """An isolated Ethernet segment between two VMs (QEMU `-netdev dgram` over loopback UDP): no DHCP, no route to
    the host or anything else; the VMs give themselves addresses. Either side may start first."""

    def __init__(self) -> None:
        self.ports = (free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM))
        self._joined = 0

    def join(self) -> tuple[int, int]:
        """(local port, remote port) for the next VM that joins."""
        if self._joined >= 2:
            raise VmLabError("a segment joins two VMs")
        local, remote = self.ports if self._joined == 0 else self.ports[::-1]
        self._joined += 1
        return local, remote


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Boot:
    """A boot seen on the console: seconds from QEMU's start to the marker, and the guest's own uptime then."""

    seconds: float
    uptime: float
    boot_id: str


@dataclass
class Spec:
    """How a VM is made. ``forwards``: host servers the guest may reach; ``segments``: isolated networks it joins;
    ``user_net=False`` leaves it with no NIC on the host's side at all (no SSH then). ``blank_disks``: new empty
    disks of these sizes (MiB) after the VM's other disks (/dev/vdb, ...), kept across its boots; ``oem_strings``:
    SMBIOS type 11 strings, which a hypervisor hands its guest (/sys/firmware/dmi/entries/11-0)."""

    memory_mib: int = 1024
    cpus: int = 1
    hardware: Hardware = field(default_factory=Hardware.new)
    hostname: str | None = None
    forwards: Sequence[Forward] = ()
    segments: Sequence[Segment] = ()
    user_net: bool = True
    accel: str | None = None  # default: accelerator()
    blank_disks: Sequence[int] = ()
    oem_strings: Sequence[str] = ()
    cpu: str | None = None  # QEMU's -cpu model (default: QEMU's own)


class VM:
    """A VM booting ``disk`` through a new overlay in ``workdir`` (or, with ``boot_in_place``, writing to ``disk``
    itself: a template being made), with ``extra`` disks after it (overlaid the same way) and the spec's blank
    ones. Start it with `start()`; `close()` always."""

    _instances = itertools.count()

    def __init__(
        self,
        name: str,
        disk: Disk,
        workdir: Path,
        spec: Spec | None = None,
        *,
        boot_in_place: bool = False,
        extra: Sequence[Disk] = (),
    ):
        self.name = name
        self.spec = spec or Spec()
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.base = disk
        self.extra_base = tuple(extra)
        self.boot_in_place = boot_in_place
        self.disk: Disk | None = disk if boot_in_place else None
        self.extra_disks: list[Disk] | None = None  # made at the first start: the extra disks, then the blank ones
        self.tag = f"vmlab-{os.getpid()}-{next(VM._instances)}-{name}"
        self.console = Console(self.workdir / "console.sock", name)
        self.console_log = self.workdir / "console.log"
        self.ssh_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.started_wall = 0.0
        self.accel = ""
        self._slot: int | None = None
        self._image_lock: int | None = None
        self.boots: list[Boot] = []
        self._marker_end = 0  # console position after the last boot marker seen
        self._segments = [segment.join() for segment in self.spec.segments]  # its side of each, for every boot

    # Life ------------------------------------------------------------------------------------------------

    def give_slot(self, slot: int) -> None:
        """A machine slot taken for this VM (scripts/vmlab/lab.py: several VMs take theirs at once)."""
        if self._slot is not None:
            os.close(self._slot)
        self._slot = slot

    def start(self, slot_timeout: float = 1800.0) -> None:
        """Take a slot (waiting for one), make the overlay, start QEMU and connect the console."""
        if self.running:
            raise VmLabError(f"{self.name} is running already")
        if self._slot is None:
            (self._slot,) = acquire_slots(1, slot_timeout)
        if self._image_lock is None:
            self._image_lock = take_lock(self.base.image.use_lock, shared=True)
        if self.disk is None:
            self.disk = self.base.overlay(self.workdir / "disk.qcow2")
        if self.extra_disks is None:
            self.extra_disks = self._extra_disks()
        for attempt in range(3):  # a port taken between choosing it and QEMU binding it: choose again
            self.ssh_port = free_port() if self.spec.user_net else None
            self._spawn()
            try:
                self.console = Console(self.workdir / "console.sock", self.name)
                self._marker_end = 0  # positions count from this connection's start
                self.console.connect(timeout=30)
                return
            except VmLabError:
                if self.proc is not None and self.proc.poll() is not None and attempt < 2 and "hostfwd" in self.log():
                    continue
                raise VmLabError(f"{self.name}: QEMU did not start: {self.log()[-2000:]}") from None

    def _extra_disks(self) -> list[Disk]:
        """The overlays of the extra disks (unless booted in place), then the blank disks: made once per VM."""
        disks = (
            list(self.extra_base)
            if self.boot_in_place
            else [d.overlay(self.workdir / f"disk{n}.qcow2") for n, d in enumerate(self.extra_base, start=1)]
        )
        for n, mib in enumerate(self.spec.blank_disks, start=len(disks) + 1):
            blank = self.workdir / f"blank{n}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), f"{int(mib)}M"])
            disks.append(Disk(blank, self.base.image, "qcow2"))
        return disks

    def _argv(self) -> list[str]:
        if self.disk is None:
            raise VmLabError(f"{self.name}: no disk")
        s = self.spec
        self.accel = s.accel or accelerator()[0]
        w = self.workdir
        argv = [
            QEMU,
            "-name",
            f"{self.name},process={self.tag}",
            "-machine",
            f"pc,accel={self.accel}",
            "-m",
            str(s.memory_mib),
            "-smp",
            str(s.cpus),
            *(["-cpu", s.cpu] if s.cpu else []),
            "-uuid",
            s.hardware.uuid,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-chardev",
            f"socket,id=console,path={w / 'console.sock'},server=on,wait=off,logfile={self.console_log},logappend=on",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{w / 'qmp.sock'},server=on,wait=off",
            "-drive",
            f"file={self.disk.path},if=none,id=disk0,format={self.disk.format},cache=writeback,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=0",
            "-device",
            "virtio-rng-pci",
        ]
        for n, extra in enumerate(self.extra_disks or (), start=1):
            argv += [
                "-drive",
                f"file={extra.path},if=none,id=disk{n},format={extra.format},cache=writeback,discard=unmap",
                "-device",
                f"virtio-blk-pci,drive=disk{n}",
            ]
        for text in s.oem_strings:
            if "," in text or not text.isprintable():
                raise VmLabError(f"{self.name}: an SMBIOS string QEMU cannot carry: {text!r}")
            argv += ["-smbios", f"type=11,value={text}"]
        macs = iter(s.hardware.macs)
        if s.user_net:
            options = ["user", "id=net0", "restrict=on", f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]
            options += [f.option() for f in s.forwards]
            argv += ["-netdev", ",".join(options), "-device", f"virtio-net-pci,netdev=net0,mac={next(macs)}"]
        for n, (local, remote) in enumerate(self._segments):
            argv += [
                "-netdev",
                f"dgram,id=seg{n},local.type=inet,local.host=127.0.0.1,local.port={local},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}",
                "-device",
                f"virtio-net-pci,netdev=seg{n},mac={next(macs)}",
            ]
        if s.hostname:
            argv += ["-fw_cfg", f"name={HOSTNAME_FW_CFG},string={s.hostname}"]
        return argv

    def _spawn(self) -> None:
        for sock in ("console.sock", "qmp.sock"):
            (self.workdir / sock).unlink(missing_ok=True)
        argv = self._argv()
        (self.workdir / "qemu.argv").write_text(json.dumps(argv) + "\n")
        with (self.workdir / "qemu.log").open("ab") as out:
            # setpriv execs QEMU (same PID) with a parent-death signal: the VM dies with the thread that started it.
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.started_wall = time.time()  # power-on, as the server's clock would say it

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "qemu.log").read_text(errors="replace")
        return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_booted(self, timeout: float = 600.0) -> Boot:
        """Wait for this boot's marker on the console (printed once multi-user.target is reached)."""
        if self.started_at is None:
            raise VmLabError(f"{self.name} was never started")
        seen = self.console.expect(_MARKER, timeout, self._marker_end)
        uptime, boot_id = float(seen.groups[0]), seen.groups[1].decode()
        self._marker_end = seen.end
        boot = Boot(round(time.monotonic() - self.started_at, 1), uptime, boot_id)
        self.boots.append(boot)
        self.console.forget_shell()
        return boot

    def run(self, command: str, timeout: float = 120.0) -> CommandResult:
        """``command`` in the guest's root shell over the serial console: exit code and output."""
        return self.console.run(command, timeout)

    def ssh_argv(self, command: str | None = None) -> list[str]:
        if self.ssh_port is None:
            raise VmLabError(f"{self.name} has no user network: no SSH")
        argv = [
            "ssh",
            "-i",
            str(self.base.image.ssh_key),
            "-p",
            str(self.ssh_port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=20",
            "root@127.0.0.1",
        ]
        return [*argv, *([command] if command is not None else [])]

    def ssh(self, command: str, timeout: float = 120.0, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """``command`` over SSH (separate stdout and stderr; binary-safe stdin); the result whatever its code."""
        try:
            r = subprocess.run(self.ssh_argv(command), input=stdin, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise VmLabError(f"{self.name}: ssh {command[:200]!r} ran past {timeout:g} s") from e
        return subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        )

    def put(self, local: Path, remote: str, mode: int = 0o644) -> None:
        """Copy a host file into the guest over SSH (atomically: a temporary name, then mv)."""
        r = self.ssh(
            f"mkdir -p \"$(dirname '{remote}')\" && cat > '{remote}.vmlab-new' && chmod {mode:o} '{remote}.vmlab-new' "
            f"&& mv '{remote}.vmlab-new' '{remote}'",
            timeout=600,
            stdin=local.read_bytes(),
        )
        if r.returncode:
            raise VmLabError(f"{self.name}: copying {local} to {remote} failed: {r.stderr.strip()}")

    def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command (the monitor's JSON protocol): its return value."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.workdir / "qmp.sock"))
            f = s.makefile("rwb")
            json.loads(f.readline())  # the greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break  # events ("event") come in between
                if "error" in reply:
                    raise VmLabError(f"{self.name}: QMP {cmd}: {reply['error']}")
            return reply["return"]

    def poweroff(self, timeout: float = STOP_TIMEOUT) -> int:
        """A clean shutdown (ACPI power button: the guest's systemd powers off), waited for; then SIGKILL if it did
        not end in time. Returns QEMU's exit code."""
        if not self.running:
            return self._reap()
        with contextlib.suppress(OSError, VmLabError, ValueError):
            self.qmp("system_powerdown")
        try:
            if self.proc is not None:
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise VmLabError(
                f"{self.name} did not power off within {timeout:g} s (killed); its console last said:\n"
                f"{self.console_tail()}"
            ) from None
        return self._reap()

    def console_tail(self, lines: int = 25) -> str:
        """The console's last ``lines`` lines (systemd's "A stop job is running for ..." names what a shutdown waits
        on), for an error."""
        try:
            text = self.console_log.read_bytes()[-16384:].decode(errors="replace")
        except OSError as e:
            return f"(no console log: {e.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """Pull the plug: SIGKILL to QEMU (the guest gets no shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reap()

    def _reap(self) -> int:
        code = self.proc.wait(timeout=30) if self.proc is not None else 0
        self.console.close()
        self._release()
        return code

    def _release(self) -> None:
        if self._slot is not None:
            os.close(self._slot)
            self._slot = None

    def close(self, keep_disk: bool = False) -> None:
        """Stop QEMU if it runs (SIGKILL: a test that wants a clean shutdown calls poweroff first), give back the
        slot, remove the sockets and, unless kept or booted in place, the overlay."""
        self.kill()
        if self._image_lock is not None:
            os.close(self._image_lock)
            self._image_lock = None
        for sock in ("console.sock", "qmp.sock"):
            (self.workdir / sock).unlink(missing_ok=True)
        if not keep_disk and not self.boot_in_place and self.disk is not None:
            self.disk.path.unlink(missing_ok=True)
            self.disk = None
        if not keep_disk and self.extra_disks is not None:
            for extra in self.extra_disks:
                if extra not in self.extra_base:  # an overlay or a blank disk of this VM's own
                    extra.path.unlink(missing_ok=True)
            self.extra_disks = None


HOLD_SECONDS = 120.0  # how long a wait for several slots keeps those it has before it lets them go and starts again


def acquire_slots(count: int, timeout: float) -> list[int]:
    """``count`` of the machine's MAX_VMS slots. The slots it finds free it keeps while it waits for the rest,
    looking often, so that VMs started one at a time (a test failover, a lab's single VM) cannot take every slot that
    frees before it: a wait for two at once otherwise loses each race and starves (CI's template clones waited most
    of a run). Kept at most HOLD_SECONDS, then let go for a random pause: whoever holds the other slot and waits for
    one more (a lab adding a VM beside a running one) is never blocked for longer."""
    if count > MAX_VMS:
        raise VmLabError(f"{count} VMs at once: this machine runs at most {MAX_VMS}")
    deadline = time.monotonic() + timeout
    while True:
        held: list[int] = []
        free = list(range(MAX_VMS))
        holding_since = 0.0
        while True:
            for n in list(free):
                if len(held) == count:
                    break
                fd = take_lock(SLOTS / f"slot-{n}.lock", timeout=0)
                if fd is not None:
                    held.append(fd)
                    free.remove(n)
                    holding_since = holding_since or time.monotonic()
            if len(held) == count:
                return held
            now = time.monotonic()
            if not held or now - holding_since >= HOLD_SECONDS or now >= deadline:
                break
            time.sleep(0.1)
        for fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)
        if time.monotonic() >= deadline:
            raise VmLabError(f"no {count} VM slots free within {timeout:g} s ({MAX_VMS} VMs at most on this machine)")
        time.sleep(random.uniform(0.5, 2.0))  # noqa: S311 - not for secrets
