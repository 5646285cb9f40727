"""The virtual machines recovery runs: the throwaway VM that boots a point (`test-failover --boot`), and what every VM
of the server shares with the appliance that inspects a point (server/process/appliance.py): the accelerator, the
machine-wide VM slots, and the rule that a VM dies with the command that started it.

A booted point is a customer's machine, untrusted: QEMU gives it no NIC at all (no route to the source, the server
or anything else), its disks are the scratch copies of the point's images, and it speaks to us on two serial ports
whose sockets only we connect to: ttyS0, the machine's console (logged, bounded), and ttyS1, the line the check
runner reports on (server/process/recovery_checks.py; bounded too). Nothing the guest prints is trusted beyond
what it says of itself.

Nothing outlives the command: QEMU runs with a parent-death signal (SIGKILL when the thread that started it ends,
a kill -9 included) and in a session of its own; `kill()` stops it by PID. Only `--keep` starts it without the
signal, to leave it running for the operator, with the slot and the scratch area's lock handed to it (both are
released when it ends)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from server.errors import FailoverToolMissing, FailoverVmBusy

QEMU = "qemu-system-x86_64"
MAX_VMS = 2  # VMs of the server (and of the project's VM lab) running on this machine at once
SLOTS = Path("/run/lock/mobility-vms")  # slot-N.lock, flock'ed by whoever runs a VM (scripts/vmlab uses them too)
BUSES = ("virtio", "scsi", "sata")
MAX_SATA_DISKS = 6  # ports of one AHCI controller
CONSOLE_LOG_BYTES = 16 << 20  # what is written of a guest's console to its log
CONSOLE_TAIL = 16 << 10  # what is kept of it for messages
REPORT_BYTES = 4 << 20  # what is read of the report line at most
REPORT_LINE = 64 << 10  # the longest report line taken


def accelerator() -> tuple[str, str]:
    """The QEMU accelerator list for this host and why: KVM where it can run an ordinary guest kernel, TCG otherwise.
    A /dev/kvm without VMX or SVM in the CPU flags (a PVM host, such as this project's machines, which runs only PVM
    guest kernels) would hang a Debian kernel without a word, so it is not offered."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    if not flags & {"vmx", "svm"}:
        return "tcg", "/dev/kvm is there but the CPU has neither VMX nor SVM (a paravirtual KVM: PVM guests only)"
    return "kvm:tcg", "KVM (VMX/SVM)"


def tied_to_this_process(argv: Sequence[str]) -> list[str]:
    """``argv`` started so that it gets SIGKILL when the thread of this process that starts it ends, however it ends
    (setpriv's parent-death signal). The shell in between closes the race where we die before the signal is set: it
    runs the program only if its parent is still us."""
    check = '[ "$PPID" = "$1" ] || exit 111; shift; exec "$@"'
    return ["setpriv", "--pdeathsig", "KILL", "--", "sh", "-c", check, "sh", str(os.getpid()), *argv]


def take_slot(wait: float) -> int:
    """One of the machine's MAX_VMS VM slots (an flock held by the returned descriptor), waiting at most ``wait``
    seconds for one: FAILOVER-VM-BUSY then."""
    SLOTS.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        for n in range(MAX_VMS):
            fd = os.open(SLOTS / f"slot-{n}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        if time.monotonic() >= deadline:
            raise FailoverVmBusy(f"{MAX_VMS} VMs run on this machine and none ended within {wait:g} s")
        time.sleep(random.uniform(0.5, 2.0))  # noqa: S311 - not for secrets


class _Serial:
    """Our end of one of the VM's serial ports (QEMU's socket, one client at a time), read by a thread: the bytes go
    to a log (bounded) and a tail, or are cut into lines (bounded) for the report."""

    def __init__(self, path: Path, name: str, *, log: Path | None = None, lines: bool = False) -> None:
        self.path, self.name = path, name
        self._log_path = log
        self._log: BinaryIO | None = None
        self._logged = 0
        self._lines = lines
        self._pending = bytearray()
        self._read = 0
        self.overflow = False  # the guest said more than we read
        self.tail: deque[bytes] = deque()
        self._tail_size = 0
        self.received: list[bytes] = []
        self.changed = threading.Condition()
        self.closed = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def connect(self, alive: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    # Through the directory's descriptor: a socket's path is limited to 107 bytes, a scratch area's
                    # is not (DATA/process/scratch/POINT-ID-.../vm/console.sock).
                    sock.connect(f"/proc/self/fd/{directory}/{self.path.name}")
                    break
                except OSError as e:
                    sock.close()
                    if alive.poll() is not None or time.monotonic() >= deadline:
                        raise OSError(f"no {self.name} at {self.path}: {e}") from e
                    time.sleep(0.05)
        finally:
            os.close(directory)
        self._sock = sock
        if self._log_path is not None:
            self._log = self._log_path.open("ab")
        self._thread = threading.Thread(target=self._run, name=f"vm-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            with self.changed:
                if not data:
                    self.closed = True
                    self.changed.notify_all()
                    return
                self._take(data)
                self.changed.notify_all()

    def _take(self, data: bytes) -> None:
        if self._log is not None and self._logged < CONSOLE_LOG_BYTES:
            piece = data[: CONSOLE_LOG_BYTES - self._logged]
            self._log.write(piece)
            self._log.flush()
            self._logged += len(piece)
        self.tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self.tail[0]) >= CONSOLE_TAIL:
            self._tail_size -= len(self.tail.popleft())
        if not self._lines:
            return
        if self._read >= REPORT_BYTES:
            self.overflow = True
            return
        data = data[: REPORT_BYTES - self._read]
        self._read += len(data)
        self._pending += data
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[:end]).rstrip(b"\r")
            del self._pending[: end + 1]
            self.received.append(line)
        if len(self._pending) > REPORT_LINE:  # a line too long to be ours: dropped up to its end
            self.overflow = True
            self._pending.clear()

    def text_tail(self, size: int = 4000) -> str:
        with self.changed:
            data = b"".join(self.tail)[-size:]
        return data.decode(errors="replace")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True)
class BootSpec:
    """How a point's VM is made: its disks in boot order (raw images), memory, CPUs, the bus its disks hang on, and
    the SMBIOS OEM strings it is given (the failover mark)."""

    disks: tuple[Path, ...]
    memory_mib: int = 1024
    cpus: int = 1
    bus: str = "virtio"
    oem_strings: tuple[str, ...] = ()
    accel: str = field(default_factory=lambda: accelerator()[0])


class VmStopped(Exception):
    """The VM ended (the guest powered off, rebooted or crashed; QEMU failed) while we waited for it."""


class BootVM:
    """A point booting under QEMU in ``workdir`` (console.sock, report.sock, console.log, qemu.log). Start it with
    `start()`; `kill()` always, or `leave_running()` for --keep."""

    def __init__(self, workdir: Path, spec: BootSpec) -> None:
        self.workdir = workdir
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = _Serial(workdir / "console.sock", "console", log=workdir / "console.log")
        self.report = _Serial(workdir / "report.sock", "report line", lines=True)
        self.started = 0.0

    def argv(self) -> list[str]:
        s = self.spec
        if s.bus not in BUSES:
            raise ValueError(f"bus {s.bus!r}")
        argv = [
            QEMU,
            "-name",
            "mobility-test-failover",
            "-machine",
            f"pc,accel={s.accel}",
            "-m",
            str(s.memory_mib),
            "-smp",
            str(s.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-nic",
            "none",  # no network at all: the machine reaches nothing, and nothing reaches it
            "-no-reboot",  # a guest that reboots ends the test instead of booting again unseen
            # Relative to QEMU's working directory (the VM's): a socket's path is limited to 107 bytes.
            "-chardev",
            "socket,id=console,path=console.sock,server=on,wait=off",
            "-serial",
            "chardev:console",
            "-chardev",
            "socket,id=report,path=report.sock,server=on,wait=off",
            "-serial",
            "chardev:report",
            "-device",
            "virtio-rng-pci",
        ]
        if s.bus == "scsi":
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        elif s.bus == "sata":
            argv += ["-device", "ahci,id=ahci0"]
        for n, disk in enumerate(s.disks):
            # A path with a comma would be read as more options: QEMU's own escape is a doubled comma.
            path = str(disk).replace(",", ",,")
            argv += ["-drive", f"file={path},if=none,id=disk{n},format=raw,cache=unsafe,discard=unmap"]
            device = {
                "virtio": f"virtio-blk-pci,drive=disk{n}",
                "scsi": f"scsi-hd,drive=disk{n},bus=scsi0.0",
                "sata": f"ide-hd,drive=disk{n},bus=ahci0.{n}",
            }[s.bus]
            argv += ["-device", f"{device},bootindex={n}"]
        for text in s.oem_strings:
            argv += ["-smbios", f"type=11,value={text}"]
        return argv

    def start(self, *, keep: bool, hand_over: Sequence[int] = ()) -> None:
        """Start QEMU and connect to both serial ports. Without ``keep`` it dies with this thread; with it, it runs
        on in a session of its own, holding the descriptors of ``hand_over`` (its slot, the scratch area's lock)."""
        if self.spec.bus == "sata" and len(self.spec.disks) > MAX_SATA_DISKS:
            raise VmStopped(f"--bus sata takes {MAX_SATA_DISKS} disks at most; this point has {len(self.spec.disks)}")
        for sock in ("console.sock", "report.sock"):
            (self.workdir / sock).unlink(missing_ok=True)
        argv = self.argv()
        (self.workdir / "qemu.argv").write_text(" ".join(argv) + "\n")
        try:
            with (self.workdir / "qemu.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    argv if keep else tied_to_this_process(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=tuple(hand_over) if keep else (),
                    cwd=self.workdir,
                )
        except FileNotFoundError as e:
            raise FailoverToolMissing(f"{QEMU} is not installed") from e
        self.started = time.monotonic()
        try:
            self.console.connect(self.proc, 30)
            self.report.connect(self.proc, 30)
        except OSError as e:
            raise VmStopped(f"QEMU did not start: {e}; {self.log_tail()}") from e

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return re.sub(r"\s+", " ", (self.workdir / "qemu.log").read_text(errors="replace"))[-size:]
        return ""

    def next_line(self, index: int, deadline: float) -> bytes | None:
        """The ``index``-th line of the report (from 0), waiting until ``deadline`` (monotonic); None when the time
        is up. VmStopped when the VM ends first."""
        with self.report.changed:
            while True:
                if index < len(self.report.received):
                    return self.report.received[index]
                if not self.running or self.report.closed:
                    raise VmStopped(f"the VM stopped (QEMU exit status {self._status()})")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.report.changed.wait(min(left, 1.0))

    def _status(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return "none yet"
        return str(self.proc.returncode)

    def kill(self) -> None:
        """Pull the plug (SIGKILL to QEMU, by PID), wait for it, and close our ends."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self._close_links()

    def leave_running(self) -> None:
        """--keep: our ends of the serial ports closed (the console is free for the operator), QEMU left running."""
        self._close_links()

    def _close_links(self) -> None:
        self.console.close()
        self.report.close()
