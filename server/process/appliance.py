"""A throwaway VM that reads a point's images for the server: libguestfs's appliance (a small Linux of the host's own
packages, booted under QEMU), driven through guestfish. Whatever a machine's disks hold (a crafted superblock, LVM
metadata, a filesystem made to crash a kernel) is parsed by the appliance's kernel, never by the server's: the
server never mounts a machine's filesystem and never attaches its images to loop devices.

How it is driven: one guestfish per appliance, its commands written to its stdin one at a time, each followed by
``echo`` of a marker with a nonce, so that the command's output is everything before the marker (no guest text can
forge the nonce); libguestfs reports a failed command on stderr, which was written before the marker and is read
once it is seen. Every command is prefixed with ``-`` (guestfish goes on after an error) and bounded in time, and
what it prints in bytes. Images are always given as raw: a raw image that looks like qcow2 never makes QEMU open a
backing file of the host's.

Nothing outlives the command: guestfish runs as the init of a PID namespace of its own (``unshare --pid --fork
--kill-child``), tied to this process with a parent-death signal (server/process/recovery_vm.py): when it ends,
however it ends, the kernel kills every process in that namespace, the appliance's QEMU included. Its temporary
files (the overlays of read-only drives) go into the scratch area given, swept with it."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import psutil

from server.errors import FailoverToolMissing
from server.process.interrupts import signals_held
from server.process.recovery_vm import accelerator, tied_to_this_process

MAX_OUTPUT = 1 << 20  # bytes one command may print
LAUNCH_TIMEOUT = 900.0  # the appliance's boot, under TCG on a loaded machine included
CALL_TIMEOUT = 300.0
_PLAIN = re.compile(r"[A-Za-z0-9_./:=,+@%-]+")
DEVICE = re.compile(r"/dev/[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}(?:/[A-Za-z0-9_.+-]{1,127})?")


class ApplianceError(Exception):
    """A command of the appliance failed; the message is libguestfs's (it may quote the guest: show it escaped)."""


def quote(word: str) -> str:
    """A word of a guestfish command: as is when plain, else double-quoted with guestfish's escapes."""
    if _PLAIN.fullmatch(word):
        return word
    out = []
    for c in word:
        if c in '\\"':
            out.append("\\" + c)
        elif c.isprintable() and ord(c) < 128:
            out.append(c)
        elif ord(c) < 256:
            out.append(f"\\x{ord(c):02x}")
        else:
            raise ValueError(f"{word[:40]!r}: only latin-1 text goes to guestfish")
    return '"' + "".join(out) + '"'


def available() -> list[str]:
    """What the appliance needs that this host lacks (programs; libguestfs finds its kernel itself)."""
    return [tool for tool in ("guestfish", "unshare", "setpriv", "stdbuf") if shutil.which(tool) is None]


class Appliance:
    """libguestfs's appliance over ``images`` (raw, in this order: /dev/sda, /dev/sdb, ... inside). ``writable``
    False: every write goes to an overlay thrown away at the end (libguestfs's read-only drives), the images are
    never changed; True: the images themselves are written (the scratch copy a point boots from, a failover's
    images). Use it as a context manager: `launch()` boots it, `close()` ends it."""

    def __init__(self, images: Sequence[Path], workdir: Path, *, writable: bool, accel: str | None = None) -> None:
        self.images = list(images)
        self.workdir = workdir
        self.writable = writable
        self.accel = accel or accelerator()[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self._err = bytearray()
        self.launch_seconds = 0.0

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.kill()

    def launch(self, timeout: float = LAUNCH_TIMEOUT) -> None:
        missing = available()
        if missing:
            raise FailoverToolMissing(f"inspecting a point needs {', '.join(missing)}")
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--pid", "--fork", "--kill-child", "--", "stdbuf", "-oL", "guestfish"]
        if not self.writable:
            argv.append("--ro")
        for image in self.images:
            argv += ["--format=raw", "-a", str(image)]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "LIBGUESTFS_TMPDIR": str(tmp),
            "LIBGUESTFS_BACKEND": "direct",
        }
        if self.accel == "tcg":  # libguestfs would take any /dev/kvm: not a paravirtual one (recovery_vm.accelerator)
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        # The appliance itself (supermin builds it from the host's packages, once, in .guestfs-UID, a directory it
        # checks it owns) is shared by every run: with TMPDIR pointed into the area, it would be built each time.
        env["LIBGUESTFS_CACHEDIR"] = "/var/tmp"  # noqa: S108 - libguestfs's own default, named
        with signals_held():  # started and watched, or not started: never running unwatched
            self.proc = subprocess.Popen(
                tied_to_this_process(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
        started = time.monotonic()
        self.call("run", timeout=timeout)
        self.launch_seconds = time.monotonic() - started

    def call(self, *words: str, timeout: float = CALL_TIMEOUT) -> str:
        """Run one guestfish command: its output; ApplianceError with libguestfs's message when it failed."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise ApplianceError("the appliance is not running")
        self._drain(proc.stderr.fileno())
        self._err.clear()
        marker = f"MOBILITY-{secrets.token_hex(12)}".encode()
        line = "-" + " ".join(quote(w) for w in words) + "\n" + f"echo {marker.decode()}\n"
        try:
            proc.stdin.write(line.encode("latin-1"))
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise ApplianceError(f"the appliance ended: {self._stderr_text()}") from e
        out = bytearray()
        deadline = time.monotonic() + timeout
        fds = [proc.stdout.fileno(), proc.stderr.fileno()]
        while True:
            if out.endswith(b"\n" + marker + b"\n") or out == marker + b"\n":
                del out[len(out) - len(marker) - 1 :]
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ApplianceError(f"{words[0]} did not finish within {timeout:g} s (the appliance was stopped)")
            ready, _, _ = select.select(fds, [], [], min(left, 5.0))
            for fd in ready:
                data = self._read(fd)
                if data is None:
                    continue
                if not data:
                    code = proc.poll()
                    raise ApplianceError(f"the appliance ended (status {code}): {self._stderr_text()}")
                if fd == fds[0]:
                    out += data
                else:
                    self._err += data
                if len(out) > MAX_OUTPUT or len(self._err) > MAX_OUTPUT:
                    self.kill()
                    raise ApplianceError(f"{words[0]} printed more than {MAX_OUTPUT} bytes (the appliance was stopped)")
        self._drain(fds[1])  # written before the marker, so it is in the pipe now
        errors = [ln for ln in self._stderr_text().splitlines() if ln.strip() and "libguestfs: warning:" not in ln]
        if errors:
            raise ApplianceError(" ".join(errors)[-1000:])
        return out.decode("utf-8", "replace")

    @staticmethod
    def _read(fd: int) -> bytes | None:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            return None

    def _drain(self, fd: int) -> None:
        while (data := self._read(fd)) is not None and data:
            self._err += data
            if len(self._err) > MAX_OUTPUT:
                del self._err[: len(self._err) - MAX_OUTPUT]

    def _stderr_text(self) -> str:
        text = self._err.decode("utf-8", "replace")
        return re.sub(r"^\*stdin\*:\d+: ", "", text, flags=re.M).strip()

    # What the inspection uses ---------------------------------------------------------------------------------------

    def filesystems(self) -> list[tuple[str, str]]:
        """(device, type) of everything libguestfs finds (partitions, whole disks, logical volumes, md arrays)."""
        found = []
        for line in self.call("list-filesystems", timeout=600).splitlines():
            device, sep, fstype = line.partition(": ")
            if sep and DEVICE.fullmatch(device):
                found.append((device, fstype.strip()[:40]))
        return found

    def devices(self) -> list[str]:
        """The disks, in the order the images were given."""
        return [d for d in self.call("list-devices").split() if DEVICE.fullmatch(d)]

    def sh(self, script: str, timeout: float = CALL_TIMEOUT) -> str:
        """A shell script run in the appliance itself (libguestfs's ``debug sh``: the appliance's tools, e.g. a
        filesystem checker run with the options the API does not offer), its output."""
        return self.call("debug", "sh", script, timeout=timeout)

    def upload(self, local: Path, remote: str, mode: int) -> None:
        self.call("upload", str(local), remote)
        self.call("chmod", f"0{mode:o}", remote)

    # The end ------------------------------------------------------------------------------------------------------

    def close(self, timeout: float = 120.0) -> None:
        """End the appliance cleanly (a writable one syncs its disks first: `shutdown` fails if it cannot), then
        guestfish."""
        proc = self.proc
        if proc is None:
            return
        try:
            if self.writable and proc.poll() is None:
                self.call("shutdown", timeout=timeout)
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the namespace's parent (by PID): its init (guestfish) gets the same, and with it every process
        of the namespace, the appliance's QEMU included."""
        proc = self.proc
        if proc is None:
            return
        with signals_held():
            inside = _descendants(proc.pid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, 9)
            proc.wait(timeout=60)
            # The kernel kills the rest of the namespace as its init dies: wait for that, the VM included.
            _, alive = psutil.wait_procs(inside, timeout=30)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.proc = None


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return list(psutil.Process(pid).children(recursive=True))
    return []
