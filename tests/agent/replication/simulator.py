"""A process server simulated at the transport boundary, as python-tuf tests its client against a simulated
repository: real TLS with certificates of the project's CA (server/api/pki.py) on loopback, the replication wire format
of agent/shared/replication_wire.py, and a durable count of its own; and the faults a network and a server cause,
programmed by the test: acknowledgements dropped, delayed, reordered or duplicated, a connection cut before or after
a frame is durable, an ERROR, a batch's records refused (and its CHECKED lost), a store that lost what it had
acknowledged.

It keeps no chunks, only what they are: the hash of every chunk of the replica as the durable frames left it
(``replica``) and the points closed (``points``), and every frame it read (``received``), so the agent's side (the
window, reconnection, what is handed back and sent again, points) is tested in milliseconds and without root. The real
process server (server/process/receiver.py) is tested against the same client in tests/server/process/."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from agent.lifecycle.identity import new_key_and_csr
from agent.replication.chunks import Geometry, chunk_hash, zero_hash
from agent.shared.replication_wire import (
    HASH_SIZE,
    HEADER,
    PROTOCOL_VERSION,
    Header,
    Hello,
    Kind,
    PointClose,
    ProtocolError,
    StreamError,
    Welcome,
    frame,
    json_frame,
    parse_batch,
    parse_json,
)
from server.api import pki

HOST_ID = "00000000-0000-4000-8000-000000000001"


@dataclass(frozen=True)
class Received:
    """A frame the simulator read: on which connection (1, 2, ...), its header and payload."""

    connection: int
    header: Header
    payload: bytes


@dataclass
class Faults:
    """What the simulator does wrong, set by the test (between connections, or from its thread before a send)."""

    drop_acks: set[int] = field(default_factory=set)  # frames made durable whose ACK is never sent
    ack_delay: float = 0.0  # seconds before each ACK goes out
    reorder: int = 0  # ACKs held until this many are due, then sent newest first
    duplicate: bool = False  # every ACK sent twice
    silent: bool = False  # frames are read and made durable, no ACK ever goes out (a stuck commit)
    cut_at: int | None = None  # the connection is cut when this frame arrives ...
    durable_at_cut: bool = False  # ... after (True) or before (False) it was made durable
    error_at: tuple[int, StreamError] | None = None  # an ERROR instead of the ACK of this frame
    refused: dict[int, list[int]] = field(default_factory=dict)  # batch seq -> record positions a CHECKED refuses
    drop_checked: set[int] = field(default_factory=set)  # batches verified whose CHECKED is never sent
    welcome_acked: int | None = None  # WELCOME says this instead of the durable count (a store that lost frames)
    known: bool = True  # WELCOME: the replica is known
    version: int = PROTOCOL_VERSION
    hashes: bytes = b""  # the replica's chunk hashes, sent after WELCOME when the agent asks
    bad_hashes: bool = False  # a HASHES frame whose length is not a whole number of hashes


class ProcessServerSimulator:
    """One listener on 127.0.0.1; each connection is served by a thread of its own, one after the other."""

    def __init__(self, tls_dir: Path) -> None:
        self.faults = Faults()
        self.durable = 0  # every frame up to this sequence is durable here
        self.received: list[Received] = []
        self.hellos: list[Hello] = []
        self.replica: dict[int, bytes] = {}  # chunk index -> its hash, as the durable frames left it
        self.points: list[PointClose] = []  # the points closed by durable POINT frames
        self.geometry: Geometry | None = None
        self.connections = 0
        self._lock = threading.Lock()
        self._server_context, self.client_context = _contexts(tls_dir)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # the accepting thread looks at _stop this often
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._current: ssl.SSLSocket | None = None
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="simulated process server", daemon=True)
        accept.start()
        self._threads.append(accept)

    # What the test sees and does ---------------------------------------------------------------------------------

    def seqs(self, kind: Kind | None = None, connection: int | None = None) -> list[int]:
        with self._lock:
            return [
                r.header.seq
                for r in self.received
                if (kind is None or r.header.kind is kind) and (connection is None or r.connection == connection)
            ]

    def chunks(self, connection: int) -> list[int]:
        """The chunk indexes the frames of ``connection`` carried, in order."""
        g = self.geometry
        assert g is not None
        with self._lock:
            frames = [r for r in self.received if r.connection == connection]
        out: list[int] = []
        for r in frames:
            if r.header.kind is Kind.CHUNK:
                out.append(r.header.offset // g.chunk_size)
            elif r.header.kind is Kind.BATCH:
                out += [rec.index for rec in parse_batch(r.payload, r.header.size, g.chunk_size, g.count)]
        return out

    def cut(self) -> None:
        """Cut the current connection now (as a reset link or a killed server does)."""
        sock = self._current
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait_for_frames(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} frames arrived, not {count}")
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        for t in self._threads:
            t.join(5)

    # Serving ------------------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(raw,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = self._server_context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.connections += 1
        connection = self.connections
        self._current = sock
        try:
            self._converse(sock, connection)
        except (OSError, ssl.SSLError, ConnectionError, struct.error, ProtocolError):
            pass  # the agent went away, or sent what the test meant it to
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _converse(self, sock: ssl.SSLSocket, connection: int) -> None:
        reader = _Reader(sock)
        header, payload = reader.frame()
        assert header.kind is Kind.HELLO, header
        hello = Hello.from_json(parse_json(payload, "HELLO"))
        self.hellos.append(hello)
        self.geometry = geometry = Geometry(hello.size, hello.chunk_size)
        f = self.faults
        acked = self.durable if f.welcome_acked is None else f.welcome_acked
        sock.sendall(json_frame(Kind.WELCOME, Welcome(acked, f.known, f.version).to_json()))
        if hello.want_hashes:
            if f.bad_hashes:
                sock.sendall(frame(Kind.HASHES, b"x" * (HASH_SIZE + 1), offset=0))
            hashes = f.hashes or self.replica_hashes()
            for at in range(0, len(hashes), 4 * HASH_SIZE):  # small frames: the offsets are checked
                sock.sendall(frame(Kind.HASHES, hashes[at : at + 4 * HASH_SIZE], offset=at // HASH_SIZE))
            sock.sendall(frame(Kind.HASHES_END, offset=len(hashes) // HASH_SIZE))
        held: list[int] = []
        while not self._stop.is_set():
            header, payload = reader.frame()
            f = self.faults
            with self._lock:
                self.received.append(Received(connection, header, payload))
            seq = header.seq
            refused = f.refused.get(seq, []) if header.kind is Kind.BATCH else []
            if f.cut_at == seq:
                if f.durable_at_cut:  # verified and committed: the connection breaks before its CHECKED is out
                    self._apply(geometry, header, payload, refused)
                f.cut_at = None  # once: the next connection goes on
                sock.shutdown(socket.SHUT_RDWR)
                return
            if header.kind is Kind.BATCH and seq not in f.drop_checked:  # every batch, as the process server does
                sock.sendall(frame(Kind.CHECKED, struct.pack(f"<{len(refused)}I", *refused), seq=seq))
            self._apply(geometry, header, payload, refused)
            if f.error_at is not None and f.error_at[0] == seq:
                sock.sendall(json_frame(Kind.ERROR, f.error_at[1].to_json()))
                return
            if f.silent or seq in f.drop_acks:
                continue
            held.append(seq)
            if len(held) < max(1, f.reorder):
                continue
            if f.ack_delay:
                time.sleep(f.ack_delay)
            for s in sorted(held, reverse=True):
                sock.sendall(frame(Kind.ACK, seq=s) * (2 if f.duplicate else 1))
            held.clear()

    def replica_hashes(self) -> bytes:
        """The replica's chunk hashes in order, a chunk never written as zeros (what a new replica holds); nothing
        before an agent said which disk it is."""
        g = self.geometry
        if g is None:
            return b""
        return b"".join(self.replica.get(i) or zero_hash(g.length(i)) for i in range(g.count))

    def _apply(self, geometry: Geometry, header: Header, payload: bytes, refused: list[int]) -> None:
        """Frame ``header`` is durable: the replica takes its chunks (a delta's hash is the rebuilt chunk's), but
        not the records its check refused."""
        with self._lock:
            if header.kind is Kind.CHUNK:
                self.replica[header.offset // geometry.chunk_size] = header.hash
            elif header.kind is Kind.BATCH:
                for n, record in enumerate(parse_batch(payload, header.size, geometry.chunk_size, geometry.count)):
                    if n not in refused:
                        self.replica[record.index] = record.hash
            elif header.kind is Kind.POINT:
                self.points.append(PointClose.from_json(parse_json(payload, "POINT")))
            self.durable = max(self.durable, header.seq)


class _Reader:
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the agent closed the stream")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[Header, bytes]:
        header = Header.unpack(self.exactly(HEADER.size))
        return header, self.exactly(header.length) if header.length else b""


def _contexts(tls_dir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The simulator's TLS (a server certificate of a fresh CA, client certificates required) and the agent's (a
    client certificate of a machine of that CA), as the real process server and agent use them."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca("simulator CA", now)
    (tls_dir / "ca.pem").write_bytes(pki.cert_pem(ca.cert))
    key, cert = pki.issue_server_cert(ca, ["127.0.0.1"], now)
    (tls_dir / "server.pem").write_bytes(pki.cert_pem(cert))
    (tls_dir / "server.key").write_bytes(pki.key_pem(key))
    client_key, csr = new_key_and_csr(HOST_ID)
    client = pki.issue_client_cert(ca, x509.load_pem_x509_csr(csr), HOST_ID, now)
    (tls_dir / "client.pem").write_bytes(pki.cert_pem(client))
    (tls_dir / "client.key").write_bytes(pki.key_pem(client_key))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
    server.load_verify_locations(cafile=str(tls_dir / "ca.pem"))
    server.verify_mode = ssl.CERT_REQUIRED
    agent = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    agent.load_cert_chain(tls_dir / "client.pem", tls_dir / "client.key")
    return server, agent


@contextlib.contextmanager
def simulated(tmp_path: Path) -> Iterator[ProcessServerSimulator]:
    sim = ProcessServerSimulator(tmp_path / "tls")
    try:
        yield sim
    finally:
        sim.close()


def disk_hashes(image: Path, chunk: int = 65536) -> bytes:
    """An image's chunk hashes, in order: what a replica of it holds."""
    data = image.read_bytes()
    return b"".join(chunk_hash(data[i : i + chunk]) for i in range(0, len(data), chunk))


def wait(what: str, condition: Callable[[], object], timeout: float = 15.0) -> None:
    """Until ``condition()`` (polled every 10 ms), or an assertion naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
