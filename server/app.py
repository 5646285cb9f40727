"""The HTTPS JSON API (aiohttp): enrolment, renewal, heartbeats, jobs, and the installer repository.

aiohttp is used because its handlers can see the TLS transport, and so the verified client certificate of a
mutual-TLS request (``transport.get_extra_info("peercert")``); ASGI servers such as uvicorn do not pass it on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.shared import wire
from agent.shared.errors import MobilityError
from agent.shared.textsafe import printable
from server import pki
from server.datadir import DataDir
from server.enrolment import Enrolment
from server.errors import (
    ApiError,
    BadRequest,
    BodyTooLarge,
    ClientCertRequired,
    HostMismatch,
    ListenFailed,
    MethodNotAllowed,
    NotFound,
    ServerInternal,
    UnknownMachine,
)
from server.repository import Repository
from server.storage import Storage

log = logging.getLogger("mobility.server")

HEARTBEAT_FLUSH_SECONDS = 1.0
TIMESTAMP_CHECK_SECONDS = 600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    data: DataDir
    storage: Storage
    enrolment: Enrolment
    repository: Repository
    clock: Callable[[], float] = time.time
    _beats: dict[str, tuple[float, str, str]] = field(default_factory=dict)

    def flush_heartbeats(self) -> int:
        beats, self._beats = self._beats, {}
        if beats:
            try:
                self.storage.record_heartbeats((h, t, v, health) for h, (t, v, health) in beats.items())
            except Exception:
                for host_id, beat in beats.items():  # kept for the next flush, unless a newer one came meanwhile
                    self._beats.setdefault(host_id, beat)
                raise
        return len(beats)


def client_host_id(request: web.Request) -> str:
    """The CN of the verified client certificate; the TLS layer has already checked it against our CA."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        raise ClientCertRequired("this call needs the machine's client certificate (mutual TLS)")
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise ClientCertRequired("the client certificate has no common name")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from e
    except RecursionError as e:  # "[[[[..." 64 KiB deep: the parser's recursion, not our failure
        raise BadRequest("the body is nested too deeply") from e


async def read_json(request: web.Request) -> Any:
    return parse_json(await request.read())


def peer_address(request: web.Request) -> str:
    return request.remote or "unknown"


def error_response(e: ApiError) -> web.Response:
    headers = {}
    retry = e.retry_after if e.retry_after is not None else (5 if e.status == 503 else None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return web.json_response({"error": e.to_json()}, status=e.status, headers=headers)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is a JSON error with a stable ID: ours, aiohttp's own HTTP errors, and anything unexpected."""
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
    app = web.Application(middlewares=[errors_as_json], client_max_size=wire.MAX_BODY)
    routes = web.RouteTableDef()

    @routes.get(f"{wire.API}/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time": server.clock()})

    @routes.get(f"{wire.API}/ca")
    async def ca(request: web.Request) -> web.Response:
        # Public: agents compare its SHA-256 with the fingerprint they pinned before trusting the server.
        return web.Response(body=server.data.ca_cert.read_bytes(), content_type="application/x-pem-file")

    @routes.post(wire.NONCE_PATH)
    async def nonce(request: web.Request) -> web.Response:
        now = server.clock()
        server.enrolment.check_rate(peer_address(request), now)
        return web.json_response({"nonce": server.enrolment.new_nonce(now), "server_time": now})

    @routes.post(wire.ENROL_PATH)
    async def enrol(request: web.Request) -> web.Response:
        body = await read_json(request)
        return web.json_response(server.enrolment.enrol(body, peer_address(request), server.clock()))

    @routes.post(wire.RENEW_PATH)
    async def renew(request: web.Request) -> web.Response:
        host_id = client_host_id(request)
        return web.json_response(server.enrolment.renew(host_id, await read_json(request), server.clock()))

    @routes.post(wire.HEARTBEAT_PATH)
    async def heartbeat(request: web.Request) -> web.Response:
        host_id = client_host_id(request)
        try:
            beat = wire.Heartbeat.from_json(await read_json(request))
        except wire.WireError as e:
            raise BadRequest(str(e)) from e
        if beat.host_id != host_id:
            raise HostMismatch(f"this certificate is for {host_id}, not {beat.host_id}")
        machine = server.storage.machine(host_id)
        if machine is None:
            raise UnknownMachine(f"host {host_id} is not registered")
        now = server.clock()
        health = beat.health or wire.HealthReport("unknown")
        server._beats[host_id] = (now, beat.agent_version, json.dumps(health.to_json()))
        return web.json_response({"interval": machine.heartbeat_interval, "server_time": now})

    @routes.post(wire.JOBS_PATH)
    async def jobs(request: web.Request) -> web.Response:
        """A machine proves who it is with its certificate, a secret with a proof over the body, or both (a
        registered host reporting on the push job that belongs to the token it was handed)."""
        raw = await request.read()
        now = server.clock()
        try:
            host_id: str | None = client_host_id(request)
        except ClientCertRequired:
            host_id = None
        nonce, proof = request.headers.get("X-Mobility-Nonce"), request.headers.get("X-Mobility-Proof")
        principals = [f"host:{host_id}"] if host_id is not None else []
        if nonce and proof:
            token_id = request.headers.get("X-Mobility-Token-Id")
            secret = server.enrolment.check_job_proof(token_id, nonce, proof, raw, peer_address(request), now)
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
        job_id = server.storage.report_job(
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
        )
        return web.json_response({"job_id": job_id})

    @routes.get(wire.REPO_METADATA_PATH + "/{name}")
    async def metadata(request: web.Request) -> web.StreamResponse:
        path = server.repository.metadata_path(request.match_info["name"])
        if path is None or not path.is_file():
            raise NotFound(f"no metadata {request.match_info['name']}")
        return web.FileResponse(path, headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    @routes.get(wire.REPO_TARGETS_PATH + "/{name}")
    async def target(request: web.Request) -> web.StreamResponse:
        path = server.repository.target_path(request.match_info["name"])
        if path is None or not path.is_file():
            raise NotFound(f"no bundle {request.match_info['name']}")
        return web.FileResponse(path, headers={"Content-Type": "application/gzip"})

    app.add_routes(routes)
    return app


def tls_context(data: DataDir) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(data.tls_cert, data.tls_key)
    ctx.load_verify_locations(cafile=str(data.ca_cert))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # enrolment comes before the client has a certificate
    return ctx


def open_server(data: DataDir, heartbeat_interval: float = 30.0, *, new_database: bool = False) -> Server:
    storage = Storage(data.database, create=new_database)
    ca = pki.Authority.load(data.ca_cert.read_bytes(), data.ca_key.read_bytes())
    repository = Repository(data)
    enrolment = Enrolment(
        storage, ca, lambda: data.passphrase.read_text().strip(), repository.root_json, heartbeat_interval
    )
    return Server(data, storage, enrolment, repository)


async def serve(server: Server, host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish requests in flight and flush heartbeats."""
    app = build_app(server)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(server.data), backlog=1024)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ListenFailed(f"cannot listen on {host}:{port}: {e.strerror}") from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("serving on https://%s:%d", host, bound)
    if ready is not None:
        ready(bound)

    async def every(seconds: float, job: Callable[[], object], in_thread: bool = False) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                # The repository job may wait for the lock a `repo add` holds: never on the event loop.
                await asyncio.to_thread(job) if in_thread else job()
            except MobilityError as e:  # e.g. DB-UNAVAILABLE on a full disk: one line, retried next period
                log.warning("periodic job failed: %s: %s", e.id, e.message)
            except Exception:
                log.exception("periodic job failed")

    tasks = [
        asyncio.create_task(every(HEARTBEAT_FLUSH_SECONDS, server.flush_heartbeats)),
        asyncio.create_task(
            every(
                TIMESTAMP_CHECK_SECONDS,
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
        await runner.cleanup()
        server.flush_heartbeats()
        server.storage.close()
        log.info("stopped")
