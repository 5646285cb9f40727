"""The serial console of a lab VM, driven like `expect`: everything the guest prints is kept (and logged by QEMU);
`expect` waits for a pattern; `run` types a command into the root shell that getty logs in automatically and
returns its exit code and output.

How `run` stays robust on a serial line: the shell is set up once per boot (no echo, no prompt, kernel messages
off the console); each command travels base64-encoded (no quoting, no history expansion, nothing the line
discipline could mangle) and is framed by markers that start with a control character the typed text never
contains, carrying a nonce, so neither an echo nor output from an earlier command can be taken for its result. A
command that runs past its timeout gets Ctrl-C, and the error carries what it printed so far."""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.vmlab.host import VmLabError

MAX_KEPT = 8 << 20  # bytes of console output kept in memory (all of it is in the console log)
_LINE_MAX = 3000  # characters per typed line: well under the tty's canonical line limit of 4095
_MARK = "\x1e"  # record separator: printed by the guest's printf, never typed (the typed text says \036)


class ConsoleTimeout(VmLabError):
    """The console did not show what was awaited in time."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True)
class Seen:
    """What `expect` found: its place in everything the console ever showed, and its groups."""

    start: int
    end: int
    groups: tuple[bytes, ...]


@dataclass(frozen=True)
class CommandResult:
    code: int
    output: str  # stdout and stderr as the console showed them, with \r\n turned into \n

    def check(self, what: str = "command") -> str:
        if self.code != 0:
            raise VmLabError(f"{what} exited {self.code}: {self.output[-3000:]}")
        return self.output


class Console:
    """A connection to the VM's serial console (QEMU's `-chardev socket`, one client at a time)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._sock: socket.socket | None = None
        self._data = bytearray()
        self._base = 0  # offset of _data[0] in everything the console ever showed
        self._changed = threading.Condition()
        self._closed = False
        self._shell_ready = False
        self._lock = threading.Lock()  # one command at a time
        self._reader: threading.Thread | None = None

    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VmLabError(f"{self.name}: no console at {self.path}: {e}") from e
                time.sleep(0.05)
        self._sock = sock
        self._reader = threading.Thread(target=self._read, name=f"console-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            with self._changed:
                if not chunk:
                    self._closed = True
                    self._changed.notify_all()
                    return
                self._data += chunk
                if len(self._data) > MAX_KEPT:
                    cut = len(self._data) - MAX_KEPT // 2
                    del self._data[:cut]
                    self._base += cut
                self._changed.notify_all()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)

    @property
    def position(self) -> int:
        """Where the console's output is now: give it to `expect` to wait for what comes after."""
        with self._changed:
            return self._base + len(self._data)

    def text(self, since: int = 0, until: int | None = None) -> str:
        """The output between two positions (what is still kept of it)."""
        with self._changed:
            start = max(since - self._base, 0)
            end = len(self._data) if until is None else max(until - self._base, 0)
            return bytes(self._data[start:end]).decode(errors="replace")

    def send(self, text: str) -> None:
        if self._sock is None:
            raise VmLabError(f"{self.name}: console not connected")
        self._sock.sendall(text.encode())

    def expect(self, pattern: str | re.Pattern[bytes], timeout: float, since: int = 0) -> Seen:
        """The first match of ``pattern`` in the output from offset ``since``; ConsoleTimeout when none comes in
        ``timeout`` seconds or the console closes (the VM ended)."""
        regex = re.compile(re.escape(pattern.encode())) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                start = max(since - self._base, 0)
                m = regex.search(self._data, start)
                if m:
                    return Seen(m.start() + self._base, m.end() + self._base, tuple(m.groups()))
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the console closed (the VM stopped)" if self._closed else f"{timeout:g} s passed"
                    tail = bytes(self._data[start:][-3000:]).decode(errors="replace")
                    raise ConsoleTimeout(f"{self.name}: {regex.pattern!r} not seen: {why}", tail)
                self._changed.wait(min(left, 1.0))

    def _setup_shell(self, timeout: float) -> None:
        """Once per boot: wake the autologin shell and make it quiet. Retried, since getty may still be starting."""
        deadline = time.monotonic() + timeout
        while True:
            nonce = secrets.token_hex(6)
            since = self.position
            self.send(
                "\x03\nstty -echo -onlcr cols 4000; export PS1= PS2= HISTFILE=/dev/null TERM=dumb PAGER=cat "
                "SYSTEMD_PAGER= SYSTEMD_COLORS=0; "
                f"dmesg -n 1 2>/dev/null; printf '\\036READY {nonce}\\n'\n"
            )
            try:
                self.expect(f"{_MARK}READY {nonce}\n", min(10.0, max(deadline - time.monotonic(), 1)), since)
                self._shell_ready = True
                return
            except ConsoleTimeout:
                if time.monotonic() >= deadline:
                    raise

    def run(self, command: str, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` (a shell command line; stdin is /dev/null) in the guest's root shell: its exit code and
        output. ConsoleTimeout (with the output so far) when it runs longer than ``timeout``: it gets Ctrl-C."""
        with self._lock:
            if not self._shell_ready:
                self._setup_shell(60.0)
            nonce = secrets.token_hex(8)
            encoded = base64.b64encode(command.encode()).decode()
            script = f"/run/vmlab-{nonce}"  # root's tmpfs in the guest
            lines = [f"rm -f {script}"]
            for i in range(0, len(encoded), _LINE_MAX):
                lines.append(f"printf %s {encoded[i : i + _LINE_MAX]} >> {script}")
            lines.append(
                f"printf '\\036BEGIN {nonce}\\n'; base64 -d {script} > {script}.sh; "
                f"bash {script}.sh </dev/null 2>&1; printf '\\036END {nonce} %d\\n' $?; rm -f {script} {script}.sh"
            )
            since = self.position
            for line in lines:
                self.send(line + "\n")
            begin = self.expect(f"{_MARK}BEGIN {nonce}\n", 30.0, since)
            end_pattern = re.compile(re.escape(f"{_MARK}END {nonce} ".encode()) + rb"(\d+)\n")
            try:
                end = self.expect(end_pattern, timeout, begin.end)
            except ConsoleTimeout as e:
                self.send("\x03")
                with contextlib.suppress(ConsoleTimeout):
                    self.expect(end_pattern, 10.0, since)
                raise ConsoleTimeout(f"{self.name}: {command[:200]!r} ran past {timeout:g} s", e.output) from e
            output = self.text(begin.end, end.start)
            return CommandResult(int(end.groups[0]), output.replace("\r\n", "\n"))

    def forget_shell(self) -> None:
        """The guest rebooted: its next shell must be set up again."""
        self._shell_ready = False
