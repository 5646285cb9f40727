"""The agent's end of a disk's stream to the process server: mutual TLS with the machine's certificate, a bounded
window of frames not yet acknowledged, and the policy's bandwidth cap.

One thread owns a stream (the disk's replicator): it writes frames with blocking sends and reads the server's
acknowledgements between them, so one TLS object is never used by two threads. A change is forgotten only when the
server's ACK covers its frame. The window keeps what each frame settles, not its bytes (the bytes in flight are
in the kernel's socket buffers and the server, not in the agent's memory): when a connection is lost, every frame
the server had not made durable is handed back (``on_lost``), and its chunk is read again from the disk and sent
on the next connection (a point in flight is abandoned: the next one is cut afresh).

A batch's deltas are known applied only from its CHECKED, never from its acknowledgement: a batch made durable whose
CHECKED did not arrive (the connection broke between the server's commit and the agent's read of it, and the next
WELCOME settled the batch) may have had deltas refused that nobody will ever name, so every one of its deltas is
taken as refused (``on_refused``) and its chunk is sent whole."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import ProcessServerUnreachable, RemoteError, ReplicaLost
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import (
    BATCH_VERSION,
    HASH_SIZE,
    HEADER,
    Header,
    Hello,
    Kind,
    ProtocolError,
    StreamError,
    Welcome,
    json_frame,
    parse_json,
)

WINDOW_BYTES = 64 * 1024 * 1024  # wire bytes in flight: enough to keep the server's group commits large
WINDOW_FRAMES = 8192
SEND_BATCH = 256 * 1024  # frames are joined up to this size per send: fewer TLS records and syscalls
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0  # a send or an awaited ACK that takes longer means the path is dead


@dataclass
class Sent:
    """A frame in the window: its size, and what its acknowledgement (or its loss) settles."""

    seq: int
    size: int
    since: float  # when the oldest change it carries was first seen (for the lag)
    on_ack: Callable[[], None] | None = None
    on_lost: Callable[[], None] | None = None
    on_refused: Callable[[list[int]], None] | None = None  # a batch's records the server did not apply
    deltas: tuple[int, ...] = ()  # the positions of a batch's records the server may refuse (its deltas)


class TokenBucket:
    """The policy's bandwidth cap on wire bytes (0: none). Bursts of one second."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = float(rate)
        self.stamp = clock()

    def wait_time(self, n: int) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Stream:
    """One disk's stream. ``connect`` (re)opens it and hands back what the server did not make durable; ``send``
    queues a frame (blocking while the window is full); ``pump`` reads ACKs."""

    def __init__(
        self,
        address: ServerAddress,
        context: ssl.SSLContext,
        *,
        window_bytes: int = WINDOW_BYTES,
        bandwidth: int = 0,
        timeout: float = IO_TIMEOUT,
    ) -> None:
        self.address = address
        self.context = context
        self.window_bytes = window_bytes
        self.bucket = TokenBucket(bandwidth)
        self.timeout = timeout
        self.sock: ssl.SSLSocket | None = None
        self.window: deque[Sent] = deque()
        self.window_size = 0
        self.next_seq = 1
        self.acked = 0
        self._out: list[bytes | memoryview] = []
        self._out_size = 0
        self._in = bytearray()
        self.wire_bytes = 0
        self.peer_version = 1  # the process server's protocol version, from its WELCOME
        # The highest batch the server verified (CHECKED). A stream's batches are verified and answered in sequence
        # order, and the window holds only frames of the current connection (``connect`` settles or hands back the
        # rest): every batch in the window up to this one was answered.
        self.checked = 0
        self.last_batch = 0  # the highest batch sent

    # Connection ------------------------------------------------------------------------------------------------

    def connect(self, hello: Hello, on_hashes: Callable[[int, bytes], None] | None = None) -> Welcome:
        """Open the stream; with ``on_hashes`` (hello.want_hashes) the replica's chunk hashes arrive first, as
        (first chunk index, hashes). Frames the server already made durable leave the window; the rest are handed
        back (``on_lost``) to be sent again from the disk."""
        self.close()
        try:
            raw = socket.create_connection((self.address.host, self.address.port), timeout=CONNECT_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.address.host)
            sock.settimeout(self.timeout)
            self.sock = sock
            sock.sendall(json_frame(Kind.HELLO, hello.to_json()))
            header, payload = self._read_frame()
            if header.kind is not Kind.WELCOME:
                raise ProtocolError(f"expected WELCOME, got {header.kind.name}")
            welcome = Welcome.from_json(parse_json(payload, "WELCOME"))
            if hello.want_hashes:
                while True:
                    header, payload = self._read_frame()
                    if header.kind is Kind.HASHES_END:
                        break
                    if header.kind is not Kind.HASHES or len(payload) % HASH_SIZE:
                        raise ProtocolError(f"expected HASHES, got {header.kind.name}")
                    if on_hashes is not None:
                        on_hashes(header.offset, payload)
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise ProcessServerUnreachable(f"process server {self.address}: {_reason(e)}") from e
        except ProtocolError:
            self.close()
            raise
        if welcome.acked_seq < self.acked:
            # The server lost what it had acknowledged (restored from an old backup, store moved aside, its index
            # rebuilt from its points): its count is the one from here on, or every later connection would say so
            # again; the caller resyncs the disk against what the server holds.
            lost = ReplicaLost(
                f"process server {self.address} acknowledged up to {self.acked} before and now holds only "
                f"{welcome.acked_seq}"
            )
            self.acked = welcome.acked_seq
            raise lost
        self._settle(welcome.acked_seq)
        self.next_seq = max(self.next_seq, welcome.acked_seq + 1)
        self.reset()
        self.peer_version = welcome.version
        return welcome

    @property
    def batches(self) -> bool:
        """Whether the process server takes BATCH frames (and deltas in them): version 2 and later."""
        return self.peer_version >= BATCH_VERSION

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self._out, self._out_size = [], 0
        self._in.clear()

    def interrupt(self) -> None:
        """From another thread: make a send or a wait of the owning thread fail at once (the agent stops)."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """Hand back every frame not acknowledged (``on_lost``) and empty the window."""
        lost, self.window = self.window, deque()
        self.window_size = 0
        for sent in lost:
            if sent.on_lost is not None:
                sent.on_lost()

    @property
    def connected(self) -> bool:
        return self.sock is not None

    # Sending ----------------------------------------------------------------------------------------------------

    def send(
        self,
        kind: Kind,
        payload: bytes | list[bytes | memoryview],
        *,
        flags: int = 0,
        offset: int = 0,
        size: int = 0,
        digest: bytes = bytes(HASH_SIZE),
        since: float = 0.0,
        on_ack: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_refused: Callable[[list[int]], None] | None = None,
        deltas: Sequence[int] = (),
    ) -> int:
        """Queue one frame (its sequence number is returned), its payload whole or in pieces sent one after the
        other; blocks while the window is full. ``deltas``: a batch's records the server may refuse (``on_refused``
        is told those it did, and all of them if its answer is lost)."""
        while self.window and (self.window_size >= self.window_bytes or len(self.window) >= WINDOW_FRAMES):
            self.flush()
            before = self.acked
            self.pump(self.timeout)
            if self.acked == before:
                self.close()
                raise ProcessServerUnreachable(
                    f"process server {self.address}: no acknowledgement for {self.timeout:.0f} s"
                )
        seq = self.next_seq
        self.next_seq += 1
        parts = payload if isinstance(payload, list) else [payload]
        length = sum(len(p) for p in parts)
        header = Header(kind, flags, length, seq, offset, size, digest).pack()
        self.window.append(Sent(seq, len(header) + length, since, on_ack, on_lost, on_refused, tuple(deltas)))
        self.window_size += len(header) + length
        if kind is Kind.BATCH:
            self.last_batch = seq
        self._queue(header)
        for part in parts:
            if part:
                self._queue(part)
        if self._out_size >= SEND_BATCH:
            self.flush()
        return seq

    def _queue(self, data: bytes | memoryview) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def flush(self) -> None:
        if not self._out:
            return
        sock = self._require()
        data = b"".join(self._out)
        self._out, self._out_size = [], 0
        pause = self.bucket.wait_time(len(data))
        if pause:
            time.sleep(pause)
        try:
            sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise ProcessServerUnreachable(f"process server {self.address}: {_reason(e)}") from e
        self.wire_bytes += len(data)
        self.pump(0)

    def pump(self, wait: float) -> int:
        """Read what the server sent (ACKs, an ERROR) for up to ``wait`` seconds; returns the acknowledged seq."""
        sock = self._require()
        deadline = time.monotonic() + wait
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if not sock.pending():
                try:
                    ready, _, _ = select.select([sock], [], [], remaining)
                except (OSError, ValueError) as e:
                    self.close()
                    raise ProcessServerUnreachable(f"process server {self.address}: {_reason(e)}") from e
                if not ready:
                    return self.acked
            try:
                data = sock.recv(65536)
            except (OSError, ssl.SSLError) as e:
                self.close()
                raise ProcessServerUnreachable(f"process server {self.address}: {_reason(e)}") from e
            if not data:
                self.close()
                raise ProcessServerUnreachable(f"process server {self.address} closed the stream")
            self._in += data
            before = self.acked
            self._parse_incoming()
            if self.acked > before:
                return self.acked  # progress: let the caller refill the window

    def _parse_incoming(self) -> None:
        while len(self._in) >= HEADER.size:
            header = Header.unpack(self._in[: HEADER.size])
            end = HEADER.size + header.length
            if len(self._in) < end:
                return
            payload = bytes(self._in[HEADER.size : end])
            del self._in[:end]
            if header.kind is Kind.ACK:
                self._settle(header.seq)
            elif header.kind is Kind.CHECKED:
                self._checked(header.seq, payload)
            elif header.kind is Kind.ERROR:
                self.close()
                err = StreamError.from_json(parse_json(payload, "ERROR"))
                raise RemoteError(err.code, err.message, err.fix)
            else:
                raise ProtocolError(f"unexpected {header.kind.name} from the process server")

    def _checked(self, seq: int, payload: bytes) -> None:
        """Batch ``seq`` was verified; ``payload`` lists the records the server did not apply (it acknowledges the
        batch all the same, once committed)."""
        if len(payload) % 4:
            raise ProtocolError("a CHECKED frame's payload is a list of 32-bit record positions")
        self.checked = max(self.checked, seq)
        if not payload:
            return
        positions = list(struct.unpack(f"<{len(payload) // 4}I", payload))
        for sent in self.window:
            if sent.seq == seq:
                if sent.on_refused is not None:
                    sent.on_refused(positions)
                return
            if sent.seq > seq:
                break

    def _settle(self, seq: int) -> None:
        self.acked = max(self.acked, seq)
        while self.window and self.window[0].seq <= seq:
            sent = self.window.popleft()
            self.window_size -= sent.size
            if sent.deltas and sent.seq > self.checked and sent.on_refused is not None:
                # Durable, but what its check refused was never heard: none of its deltas is known applied.
                sent.on_refused(list(sent.deltas))
            if sent.on_ack is not None:
                sent.on_ack()

    def wait_checked(self, timeout: float) -> bool:
        """Wait until the server verified every batch sent (True), or ``timeout`` passes (False): what refuses a
        delta is known then, well before the commit that acknowledges it."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.checked < self.last_batch and self.window and time.monotonic() < deadline:
            self.pump(min(0.5, max(0.0, deadline - time.monotonic())))
        return self.checked >= self.last_batch or not self.window

    def drain(self, timeout: float) -> bool:
        """Wait until every frame is acknowledged (True), or ``timeout`` passes (False)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.window and time.monotonic() < deadline:
            self.pump(min(1.0, max(0.0, deadline - time.monotonic())))
        return not self.window

    def oldest_unacked(self) -> float | None:
        """When the change of the oldest frame still waiting for an acknowledgement was first seen (from any
        thread: frames go in roughly in that order, so the first one stands for the window)."""
        try:
            return self.window[0].since or None
        except IndexError:
            return None

    # Reading frames while connecting ----------------------------------------------------------------------------

    def _read_frame(self) -> tuple[Header, bytes]:
        header = Header.unpack(self._read_exact(HEADER.size))
        payload = self._read_exact(header.length) if header.length else b""
        if header.kind is Kind.ERROR:
            self.close()
            err = StreamError.from_json(parse_json(payload, "ERROR"))
            raise RemoteError(err.code, err.message, err.fix)
        return header, payload

    def _read_exact(self, n: int) -> bytes:
        sock = self._require()
        while len(self._in) < n:
            data = sock.recv(max(65536, n - len(self._in)))
            if not data:
                raise ConnectionResetError("the process server closed the stream")
            self._in += data
        out = bytes(self._in[:n])
        del self._in[:n]
        return out

    def _require(self) -> ssl.SSLSocket:
        if self.sock is None:
            raise ProcessServerUnreachable(f"process server {self.address}: not connected")
        return self.sock


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__
