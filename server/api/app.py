"""The HTTPS JSON API (aiohttp): enrolment, renewal, heartbeats, jobs, and the installer repository.

aiohttp is used because its handlers can see the TLS transport, and so the verified client certificate of a
mutual-TLS request (``transport.get_extra_info("peercert")``); ASGI servers such as uvicorn do not pass it on.

The event loop only parses, routes and answers: every database call, signature, file read and repository change runs
in a bounded pool of worker threads (``Server.offload``), and a stall monitor (server/api/stalls.py) measures how late
the loop wakes. Nothing a request needs lives in one process (nonces are signed, their use, the failure counts and
the machines are in the database), so several instances can share one PostgreSQL database behind a TCP load
balancer; each buffers the heartbeats it receives and flushes them once a second."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import logging
import resource
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from aiohttp import web

from agent.faults import fault_point
from agent.shared import wire
from agent.shared.errors import MobilityError
from agent.shared.replication_wire import ProcessAddress, Protection
from agent.shared.textsafe import printable
from server.api import pki
from server.api.edge import (
    KEEPALIVE_SECONDS,
    LINGER_SECONDS,
    MAX_HEADERS,
    MAX_LINE,
    AdmissionGate,
    Connections,
    GuardedHandler,
    GuardedSite,
    read_body,
)
from server.api.enrolment import Enrolment
from server.api.metrics import ServerMetrics
from server.api.nonces import NonceSigner, load_or_create_key
from server.api.stalls import StallMonitor
from server.api.tls import listener_context, peer_identity
from server.database.certificates import Credential
from server.database.connection import Database
from server.database.heartbeats import Beat
from server.database.storage import Storage, Tx
from server.datadir import DataDir
from server.errors import (
    ApiError,
    BadRequest,
    BodyTooLarge,
    ClientCertRequired,
    DatabaseUnavailable,
    HostMismatch,
    ListenFailed,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    ServerBusy,
    ServerInternal,
    StoreBusy,
    UnknownMachine,
)
from server.process.service import ProcessOptions, ProcessService, store_dir
from server.releases.repository import Repository
from server.releases.rollouts import target_of

if TYPE_CHECKING:
    from server.ui.site import UiOptions

log = logging.getLogger("mobility.server")

HEARTBEAT_FLUSH_SECONDS = 1.0
TIMESTAMP_CHECK_SECONDS = 600.0
PRUNE_SECONDS = 60.0
ROLLOUT_SECONDS = 2.0  # how often each serving instance advances the running rollouts (server/releases/rollouts.py)
TAKEOVER_SECONDS = 15.0  # how often an instance without the process server role looks whether it is free
MAX_BUFFERED_BEATS = 200_000  # > a fleet's worth: past it heartbeats are refused 503 until a flush succeeds
MAX_BUFFERED_HISTORY = 50_000
LISTEN_BACKLOG = 8192  # a fleet reconnecting at once (a restart): an overflowing queue drops them (capped by somaxconn)
WORKERS = 4  # threads per pool; the database pool has room for both pools and the periodic jobs

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Buffers:
    """What an instance has received and not yet written: the newest beat per machine, queued reports as history,
    and the newest replication status per protected machine (received at, JSON)."""

    beats: dict[str, Beat]
    history: list[tuple[str, float | None, float, wire.HealthReport]]
    replication: dict[str, tuple[float, str]]


@dataclass
class Server:
    data: DataDir
    storage: Storage
    enrolment: Enrolment
    repository: Repository
    clock: Callable[[], float] = time.time
    max_connections: int = 16_000
    stats_interval: float = 60.0
    process: ProcessAddress | None = None  # where agents send replication streams (announced in the answer)
    _beats: dict[str, Beat] = field(default_factory=dict)
    _history: list[tuple[str, float | None, float, wire.HealthReport]] = field(default_factory=list)
    _replication: dict[str, tuple[float, str]] = field(default_factory=dict)  # host ID -> (received, report JSON)
    stalls: StallMonitor = field(default_factory=StallMonitor)
    ui_address: str | None = None  # where the dashboard listens, once it does (server/ui/)

    def __post_init__(self) -> None:
        # Two pools: the heartbeat path never waits behind enrolments, repository work or a slow flush.
        self.hot = ThreadPoolExecutor(WORKERS, thread_name_prefix="hot")
        self.slow = ThreadPoolExecutor(WORKERS, thread_name_prefix="slow")
        self.background = ThreadPoolExecutor(2, thread_name_prefix="periodic")
        self.ca_pem = self.data.ca_cert.read_bytes()
        self.connections = Connections(self.max_connections)
        self.credentials = Credentials(self)
        self._gates: dict[str, AdmissionGate] = {}
        self.metrics = ServerMetrics(self.stalls, self.connections)  # /metrics: this instance's own figures

    def gate(self, name: str) -> AdmissionGate:
        """The gates are made on the serving loop (asyncio primitives belong to one loop)."""
        if name not in self._gates:
            # Heartbeats are cheap once batched (``Credentials``): many may be in flight; the queue bounds memory.
            limit, queue = {"heartbeat": (2000, 4000), "enrol": (WORKERS, 256), "open": (WORKERS * 2, 512)}[name]
            self._gates[name] = AdmissionGate(name, limit, queue)
        return self._gates[name]

    async def offload(self, pool: ThreadPoolExecutor, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run blocking work (database, signing, files) in a worker thread of ``pool``, never on the loop."""
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    def buffer_heartbeat(self, beat: Beat) -> None:
        if len(self._beats) >= MAX_BUFFERED_BEATS and beat.host_id not in self._beats:
            raise ServerBusy("heartbeats cannot be written right now; retry later", retry_after=10)
        self._beats[beat.host_id] = beat  # the newest per machine: the flush writes only that one

    def buffer_replication(self, host_id: str, now: float, report: str) -> None:
        """The replication status a protected machine reported (bounded like the heartbeats it came with)."""
        if len(self._replication) >= MAX_BUFFERED_BEATS and host_id not in self._replication:
            raise ServerBusy("heartbeats cannot be written right now; retry later", retry_after=10)
        self._replication[host_id] = (now, report)

    def protection_for(self, machine: Credential) -> Protection | None:
        """What the machine is to protect, as its heartbeat answer carries it (None: nothing)."""
        row = machine.protection
        if row is None or self.process is None:
            return None
        return Protection(row.disks, row.all_disks, row.policy, self.process, row.paused)

    def buffer_history(self, host_id: str, reported_at: float | None, now: float, health: wire.HealthReport) -> None:
        if len(self._history) >= MAX_BUFFERED_HISTORY:
            raise ServerBusy("queued reports cannot be written right now; retry later", retry_after=10)
        self._history.append((host_id, reported_at, now, health))

    def _take_buffers(self) -> Buffers:
        """The buffers to write, and fresh ones for what arrives meanwhile (on the loop: handlers fill them there)."""
        taken = Buffers(self._beats, self._history, self._replication)
        self._beats, self._history, self._replication = {}, [], {}
        return taken

    def _write_buffers(self, buffers: Buffers) -> None:
        if buffers.beats:
            self.storage.record_heartbeats(buffers.beats.values())
        if buffers.history:
            self.storage.record_history(buffers.history)
        if buffers.replication:
            self.storage.record_replication((h, t, r) for h, (t, r) in buffers.replication.items())

    def _keep_buffers(self, buffers: Buffers) -> None:
        """After a failed write: kept for the next flush, unless a newer beat of the same machine came meanwhile."""
        for host_id, beat in buffers.beats.items():
            current = self._beats.get(host_id)
            if current is None or current.received_at < beat.received_at:
                self._beats[host_id] = beat
        self._history[:0] = buffers.history
        for host_id, report in buffers.replication.items():
            self._replication.setdefault(host_id, report)

    async def flush(self) -> int:
        """Write the buffered heartbeats in one transaction, in a worker thread; the buffers are swapped on the loop,
        so no handler ever adds to a buffer being written."""
        buffers = self._take_buffers()
        try:
            await self.offload(self.background, self._write_buffers, buffers)
        except Exception:
            self._keep_buffers(buffers)
            raise
        return len(buffers.beats)

    def advance_rollouts(self) -> None:
        """Advance the running rollouts from what the machines reported (a worker thread: it writes the database;
        instances take turns through an advisory lock on PostgreSQL)."""
        from server.releases.rollouts import Rollouts

        for change in Rollouts(self.storage).advance(self.clock()):
            log.info("%s", printable(change, 2000))

    def flush_heartbeats(self) -> int:
        """The same, blocking: when nothing else runs on the loop (the server's last flush as it stops, tests)."""
        buffers = self._take_buffers()
        try:
            self._write_buffers(buffers)
        except Exception:
            self._keep_buffers(buffers)
            raise
        return len(buffers.beats)

    def close(self) -> None:
        for pool in (self.hot, self.slow, self.background):
            pool.shutdown(wait=True)


def client_certificate(request: web.Request) -> tuple[str, str]:
    """The CN and serial number of the verified client certificate; the TLS layer has checked it against our CA."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        raise ClientCertRequired("this call needs the machine's client certificate (mutual TLS)")
    identity = peer_identity(cert)
    if identity is None:
        raise ClientCertRequired("the client certificate has no common name")
    return identity


def client_host_id(request: web.Request) -> str:
    return client_certificate(request)[0]


async def authenticate(server: Server, request: web.Request) -> Credential:
    """The machine whose current certificate made this request: a removed host, a revoked host and a certificate a
    renewal or re-enrolment replaced are refused here, on every route that takes a certificate. Lookups that arrive
    together are made in one query (``Credentials``), so a fleet's heartbeats cost a thread hop per batch."""
    host_id, serial = client_certificate(request)
    credential = await server.credentials.lookup(host_id)
    if credential is None:
        raise UnknownMachine(f"host {host_id} is not registered (or was removed)")
    if credential.verify(serial):
        await server.offload(server.slow, server.storage.promote, credential)
    return credential


class Credentials:
    """Batches credential lookups: while one query runs in a worker thread, the next lookups queue up and go in the
    next query together (each caller still gets only its own row).

    While the database is unavailable, a credential this instance verified within ``STALE_SECONDS`` still stands
    (nobody can revoke anything meanwhile: revocation is a database write), so enrolled machines' heartbeats are
    answered and buffered until the database is back."""

    MAX_BATCH = 500
    STALE_SECONDS = 600.0
    MAX_KNOWN = 200_000

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pending: dict[str, list[asyncio.Future[Credential | None]]] = {}
        self.running = False
        self.known: dict[str, tuple[Credential, float]] = {}

    async def lookup(self, host_id: str) -> Credential | None:
        future: asyncio.Future[Credential | None] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(host_id, []).append(future)
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = dict(list(self.pending.items())[: self.MAX_BATCH])
                for host_id in batch:
                    del self.pending[host_id]
                try:
                    rows = await self.server.offload(self.server.hot, self.server.storage.credentials, list(batch))
                except DatabaseUnavailable as e:
                    self._from_memory(batch, e)
                    continue
                except Exception as e:
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(e)
                    continue
                now = time.monotonic()
                if len(self.known) + len(rows) > self.MAX_KNOWN:
                    self.known.clear()
                for host_id, futures in batch.items():
                    row = rows.get(host_id)
                    if row is None:
                        self.known.pop(host_id, None)
                    else:
                        self.known[host_id] = (row, now)
                    for f in futures:
                        if not f.done():
                            f.set_result(row)
        finally:
            self.running = False

    def _from_memory(self, batch: dict[str, list[asyncio.Future[Credential | None]]], e: DatabaseUnavailable) -> None:
        now = time.monotonic()
        for host_id, futures in batch.items():
            known = self.known.get(host_id)
            for f in futures:
                if f.done():
                    continue
                if known is not None and now - known[1] <= self.STALE_SECONDS:
                    f.set_result(known[0])
                else:
                    f.set_exception(e)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from e
    except RecursionError as e:  # "[[[[..." 64 KiB deep: the parser's recursion, not our failure
        raise BadRequest("the body is nested too deeply") from e


def peer_address(request: web.Request) -> str:
    return request.remote or "unknown"


def error_response(e: ApiError) -> web.Response:
    headers = {}
    retry = e.retry_after if e.retry_after is not None else (5 if e.status == 503 else None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    resp = web.json_response({"error": e.to_json()}, status=e.status, headers=headers)
    if isinstance(e, RequestTimeout):
        resp.force_close()  # the rest of a trickled body must not be read as the next request
    return resp


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is a JSON error with a stable ID: ours, aiohttp's own HTTP errors, and anything unexpected."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.request_arrived()  # the line and headers are in: the slow-client clock stops
    try:
        return await _handled(request, handler)
    finally:
        if isinstance(protocol, GuardedHandler):
            protocol.request_done()


async def _handled(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such endpoint: {printable(request.path, 100)}"))
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        return error_response(MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}"))
    except web.HTTPRequestEntityTooLarge:
        return error_response(BodyTooLarge(f"the body is larger than {wire.MAX_BODY} bytes"))
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(BadRequest(f"HTTP {e.status}: {e.reason}"))
        raise
    except Exception:
        log.exception("%s %s failed", request.method, printable(request.path, 100))
        return error_response(ServerInternal("the server could not handle this request"))


def build_app(server: Server) -> web.Application:
    @web.middleware
    async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await server.metrics.observe(request, handler)

    app = web.Application(middlewares=[measured, errors_as_json], client_max_size=wire.MAX_BODY)
    routes = web.RouteTableDef()

    @routes.get(f"{wire.API}/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time": server.clock()})

    @routes.get(f"{wire.API}/ca")
    async def ca(request: web.Request) -> web.Response:
        # Public: agents compare its SHA-256 with the fingerprint they pinned before trusting the server.
        return web.Response(body=server.ca_pem, content_type="application/x-pem-file")

    @routes.post(wire.NONCE_PATH)
    async def nonce(request: web.Request) -> web.Response:
        now = server.clock()
        async with server.gate("open").enter():
            await server.offload(server.slow, server.enrolment.check_rate, peer_address(request), now)
        return web.json_response({"nonce": server.enrolment.new_nonce(now), "server_time": now})

    @routes.post(wire.ENROL_PATH)
    async def enrol(request: web.Request) -> web.Response:
        try:
            body = parse_json(await read_body(request))
            async with server.gate("enrol").enter():
                answer = await server.offload(
                    server.slow, server.enrolment.enrol, body, peer_address(request), server.clock()
                )
        except MobilityError as e:
            server.metrics.enrolment(e.id)
            raise
        server.metrics.enrolment("enrolled")
        return web.json_response(answer)

    @routes.post(wire.RENEW_PATH)
    async def renew(request: web.Request) -> web.Response:
        machine = await authenticate(server, request)
        body = parse_json(await read_body(request))
        async with server.gate("enrol").enter():
            answer = await server.offload(server.slow, server.enrolment.renew, machine.host_id, body, server.clock())
        return web.json_response(answer)

    @routes.post(wire.HEARTBEAT_PATH)
    async def heartbeat(request: web.Request) -> web.Response:
        client_certificate(request)  # no certificate: 401 before anything is read
        raw = await read_body(request)
        async with server.gate("heartbeat").enter():
            machine = await authenticate(server, request)
        try:
            beat = wire.Heartbeat.from_json(parse_json(raw))
        except wire.WireError as e:
            raise BadRequest(str(e)) from e
        if beat.host_id != machine.host_id:
            raise HostMismatch(f"this certificate is for {machine.host_id}, not {beat.host_id}")
        now = server.clock()
        health = beat.health or wire.HealthReport("unknown")
        if beat.queued:
            # Sent from the daemon's backlog after an outage: what was true then, never the current state.
            server.buffer_history(machine.host_id, health.time, now, health)
        else:
            server.buffer_heartbeat(Beat(machine.host_id, now, beat.agent_version, json.dumps(health.to_json())))
            if beat.replication is not None:
                server.buffer_replication(machine.host_id, now, json.dumps(beat.replication.to_json()))
        answer: dict[str, object] = {"interval": machine.heartbeat_interval, "server_time": now}
        if server.process is not None:  # an instance that does not know where the process server is says nothing
            protection = server.protection_for(machine)
            answer["protection"] = protection.to_json() if protection else None
        target = target_of(machine)
        if target is not None:
            answer["update"] = target.to_json()  # where a machine learns the version it should run
        return web.json_response(answer)

    @routes.post(wire.JOBS_PATH)
    async def jobs(request: web.Request) -> web.Response:
        """A machine proves who it is with its certificate, a secret with a proof over the body, or both (a
        registered host reporting on the push job that belongs to the token it was handed)."""
        raw = await read_body(request)
        now = server.clock()
        try:
            client_certificate(request)
        except ClientCertRequired:
            host_id: str | None = None
        else:
            host_id = (await authenticate(server, request)).host_id
        nonce, proof = request.headers.get("X-Mobility-Nonce"), request.headers.get("X-Mobility-Proof")
        principals = [f"host:{host_id}"] if host_id is not None else []
        if nonce and proof:
            token_id = request.headers.get("X-Mobility-Token-Id")
            async with server.gate("enrol").enter():
                secret = await server.offload(
                    server.slow,
                    server.enrolment.check_job_proof,
                    token_id,
                    nonce,
                    proof,
                    raw,
                    peer_address(request),
                    now,
                )
            principals.append(secret.principal)
        elif host_id is None:
            raise ClientCertRequired("a job report needs the machine's certificate or a proof of the secret")
        try:
            job = wire.JobReport.from_json(parse_json(raw))
        except wire.WireError as e:
            raise BadRequest(str(e)) from e
        if host_id is not None and job.host_id not in (None, host_id):
            raise HostMismatch(f"this certificate is for {host_id}, not {job.host_id}")
        if host_id is None and job.host_id is not None:
            raise HostMismatch("a report without the machine's certificate cannot name a host ID")
        then = None
        if job.kind == "upgrade" and job.state == "failed" and host_id is not None and job.job_id is not None:
            from server.releases.rollouts import pin_back_failed_pin

            def then(tx: Tx, host_id: str = host_id, job_id: str = job.job_id) -> None:
                change = pin_back_failed_pin(tx, host_id, job_id, job.runs, job.error_id)
                if change is not None:
                    log.info("%s", printable(change, 2000))

        job_id = await server.offload(
            server.slow,
            server.storage.report_job,
            principals=principals,
            job_id=job.job_id,
            host_id=host_id,
            hostname=job.hostname,
            kind=job.kind,
            state=job.state,
            error_id=job.error_id,
            remediation=job.remediation,
            detail=job.detail,
            now=now,
            then=then,
        )
        return web.json_response({"job_id": job_id})

    @routes.get(wire.REPO_METADATA_PATH + "/{name}")
    async def metadata(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        fault_point("repo.serve", file=name)  # the update tests' repository that answers 503
        path = await server.offload(server.slow, server.repository.metadata_path, name)
        if path is None:
            raise NotFound(f"no metadata {name}")
        return web.FileResponse(path, headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    @routes.get(wire.REPO_TARGETS_PATH + "/{name}")
    async def target(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        fault_point("repo.serve", file=name)
        path = await server.offload(server.slow, server.repository.target_path, name)
        if path is None:
            raise NotFound(f"no bundle {name}")
        return web.FileResponse(path, headers={"Content-Type": "application/gzip"})

    app.add_routes(routes)
    return app


def open_server(
    data: DataDir,
    db: Database,
    heartbeat_interval: float = 30.0,
    *,
    new_database: bool = False,
    max_connections: int | None = None,
    stats_interval: float = 60.0,
) -> Server:
    storage = Storage.open(db, create=new_database)
    try:
        ca = pki.Authority.load(data.ca_cert.read_bytes(), data.ca_key.read_bytes())
        repository = Repository(data, storage=storage)
        enrolment = Enrolment(
            storage,
            ca,
            lambda: data.passphrase.read_text().strip(),
            repository.root_json,
            heartbeat_interval,
            NonceSigner(load_or_create_key(data.nonce_key)),
        )
    except BaseException:
        storage.close()
        raise
    return Server(
        data,
        storage,
        enrolment,
        repository,
        max_connections=max_connections or connection_limit(),
        stats_interval=stats_interval,
    )


def connection_limit() -> int:
    """As many connections as this process may open files, less a margin (raised to the hard limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(64, min(soft, 1 << 20) - 256)


TLS_READ_BUFFER = 32 * 1024


def small_tls_buffers() -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer: 2.5 GiB for a fleet of 10,000 kept-alive agents.
    A TLS record is at most 16 KiB and the API's requests are small, so 32 KiB loses nothing."""
    import asyncio.sslproto

    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


GC_FULL_AFTER = 1000  # middle collections between full ones (Python's default: 10)


def long_lived_gc() -> None:
    """Collect garbage for a process whose heap is mostly long-lived: a fleet's kept-alive connections are some 50
    objects each, and a full collection walks all of them with the loop stopped (450-640 ms at 10,000 connections,
    every few seconds while connections were added: the fleet benchmark's worst heartbeat latencies). What the server
    loaded before serving (modules, the database engine, TLS) is frozen out of every collection, and a full
    collection runs a hundred times less often. Young collections keep Python's default: requests leave small cycles
    behind, and collecting them often keeps each pause short (at 50,000 allocations they took 170-270 ms)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, GC_FULL_AFTER)


async def serve(
    server: Server,
    host: str,
    port: int,
    ready: Callable[[int, int | None], None] | None = None,
    *,
    process: ProcessOptions | None = None,
    api: bool = True,
    elsewhere: ProcessAddress | None = None,
    ui: UiOptions | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish requests in flight and flush heartbeats. With
    ``process`` the process server role (the replication streams) runs beside the API; without ``api`` it runs
    alone (`serve --role process`); without ``process``, agents are sent to the one ``elsewhere``. With ``ui``, the
    dashboard and /metrics listen too (server/ui/)."""
    small_tls_buffers()
    roles = _ProcessRole(server, process, elsewhere)
    if process is not None and not await roles.take(quiet=api) and not api:
        raise StoreBusy(f"another process server writes {store_dir(server.data)}")  # --role process: its only job
    if not api:
        await _serve_process_only(server, ready, roles)
        return
    service, process_port = roles.service, roles.port
    app = build_app(server)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        keepalive_timeout=KEEPALIVE_SECONDS,
        lingering_time=LINGER_SECONDS,
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    site = GuardedSite(
        runner,
        host,
        port,
        connections=server.connections,
        ssl_context=listener_context(server.data.tls_cert, server.data.tls_key, server.data.ca_cert, ssl.CERT_OPTIONAL),
        backlog=LISTEN_BACKLOG,
    )
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await roles.close()
        raise ListenFailed(f"cannot listen on {host}:{port}: {e.strerror}") from e
    dashboard = None
    if ui is not None:
        from server.ui.site import Ui

        dashboard = Ui(server, ui)
        try:
            ui_port = await dashboard.start()
        except BaseException:
            await dashboard.close()
            await runner.cleanup()
            await roles.close()
            raise
        server.ui_address = f"{ui.host}:{ui_port}"
    stop = _stop_event()
    bound = runner.addresses[0][1] if runner.addresses else port
    long_lived_gc()
    log.info(
        "serving on https://%s:%d (%s; at most %d connections)", host, bound, server.storage.db, server.max_connections
    )
    if process is not None and service is not None:
        # Logged once the API listens too: a port in use makes `serve` fail with nothing but its error.
        log.info("process server receiving on %s:%d", process.host, process_port)
    if ready is not None:
        ready(bound, process_port)

    async def every(seconds: float, job: Callable[[], object], *, in_thread: bool = True) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                result = await server.offload(server.background, job) if in_thread else job()
                if asyncio.iscoroutine(result):
                    await result
            except MobilityError as e:  # e.g. DB-UNAVAILABLE on a full disk: one line, retried next period
                log.warning("periodic job failed: %s: %s", e.id, e.message)
            except Exception:
                log.exception("periodic job failed")

    def report(final: bool = False) -> None:
        c = server.connections
        stalls = server.stalls.summary() if final else server.stalls.take_window(server.stats_interval)
        log.info(
            "%s; %d connections open and %d replication streams, %d refused, %d timed out",
            stalls,
            len(c.open),
            c.streams,
            c.refused,
            c.timed_out,
        )

    tasks = [
        asyncio.create_task(server.stalls.run()),
        asyncio.create_task(every(HEARTBEAT_FLUSH_SECONDS, server.flush, in_thread=False)),
        asyncio.create_task(every(PRUNE_SECONDS, lambda: server.storage.prune(server.clock()))),
        asyncio.create_task(every(ROLLOUT_SECONDS, server.advance_rollouts)),
        asyncio.create_task(every(1.0, lambda: server.connections.sweep(time.monotonic()), in_thread=False)),
        asyncio.create_task(every(server.stats_interval, report, in_thread=False)),
        asyncio.create_task(every(TAKEOVER_SECONDS, roles.take, in_thread=False)),
        asyncio.create_task(
            every(
                TIMESTAMP_CHECK_SECONDS,
                # The repository job may wait for the lock a `repo add` holds: never on the event loop.
                lambda: server.repository.refresh_timestamp(
                    dt.datetime.fromtimestamp(server.clock(), dt.UTC), dt.timedelta(seconds=2 * TIMESTAMP_CHECK_SECONDS)
                ),
            )
        ),
    ]
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight")
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if dashboard is not None:
            await dashboard.close()
        await runner.cleanup()
        await roles.close()
        with contextlib.suppress(MobilityError):
            await server.flush()
        report(final=True)
        server.close()
        server.storage.close()
        log.info("stopped")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class _ProcessRole:
    """The process server role of one serving instance. Instances that share a data directory share its chunk
    store, which one process server writes (``writer.lock``): the first takes the role; the others serve the API,
    send agents to the same address (a balancer's, a shared name) and take the role over when its holder stops."""

    def __init__(self, server: Server, options: ProcessOptions | None, elsewhere: ProcessAddress | None) -> None:
        self.server = server
        self.options = options
        self.service: ProcessService | None = None
        self.port: int | None = None
        self._standby_logged = False
        server.process = elsewhere
        if options is not None and options.port:  # where the role's holder listens, as far as this one knows
            server.process = ProcessAddress(options.announce, options.announce_port or options.port)

    async def take(self, *, quiet: bool = False) -> bool:
        """Take the role if it is free (True when this instance has it)."""
        if self.options is None or self.service is not None:
            return self.service is not None
        try:
            service = ProcessService(self.server.data, self.server.storage.db, self.options, self.server.connections)
        except StoreBusy as e:
            if quiet and not self._standby_logged:
                self._standby_logged = True
                log.info("%s: this instance serves the API; it takes the process server role when free", e.message)
            return False
        try:
            self.port = await service.start()
        except BaseException:
            await service.close()
            raise
        self.service = service
        self.server.process = ProcessAddress(self.options.announce, self.options.announce_port or self.port)
        if self._standby_logged:
            log.info("process server receiving on %s:%d (the role taken over)", self.options.host, self.port)
        return True

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None


async def _serve_process_only(
    server: Server, ready: Callable[[int, int | None], None] | None, roles: _ProcessRole
) -> None:
    """`serve --role process`: only the replication streams; the API's periodic jobs are the API instances'."""
    stop = _stop_event()
    log.info("process server receiving on port %d (%s)", roles.port, server.storage.db)
    if ready is not None:
        ready(roles.port or 0, roles.port)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await roles.close()
        server.close()
        server.storage.close()
        log.info("stopped")
