"""What a client can cost the server before a handler runs, bounded: connections, slow requests, queues.

- **Connections**: at most ``max_connections`` open, the process server's replication streams included (they share
  the process's open files); one more is answered 503 SERVER-BUSY and closed. Connections without a client
  certificate (enrolment, anyone on the network) may hold only a quarter of them, and so may replication connections
  not past their TLS handshake and HELLO, so a flood of anonymous connections on either port never locks enrolled
  machines out.
- **Slow clients**: a TLS handshake has ``HANDSHAKE_SECONDS``; a new connection's first request, and any request
  once its first byte arrived, must have its line and headers in within ``HEADER_SECONDS`` and its body within
  ``BODY_SECONDS`` (408 REQUEST-TIMEOUT and the connection is closed). An idle kept-alive connection is closed after
  ``KEEPALIVE_SECONDS``.
- **Malformed requests**: a request line or header over 8 KiB, or more than 64 headers, is 431 HEADERS-TOO-LARGE,
  other garbage 400 BAD-REQUEST, both as the API's JSON errors (aiohttp would answer them in plain text).
- **Queues**: expensive work (enrolment, renewal, proofs) and the heartbeat path each pass an ``AdmissionGate``: a
  bounded number run at once, a bounded number wait, and the rest are told 503 SERVER-BUSY with a jittered Retry-After
  at once, instead of timing out. Enrolled machines' heartbeats have a gate of their own, so a storm of enrolments or
  of unauthenticated requests never starves them."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong

from server.errors import ApiError, BadRequest, HeadersTooLarge, RequestTimeout, ServerBusy

log = logging.getLogger("mobility.server.edge")

HANDSHAKE_SECONDS = 10.0
HEADER_SECONDS = 10.0
BODY_SECONDS = 10.0
KEEPALIVE_SECONDS = 75.0  # > the 30 s heartbeat: a daemon keeps its connection between heartbeats
LINGER_SECONDS = 1.0  # unread body still arriving after an error answer is drained this long, then the socket closes
MAX_LINE = 8190
MAX_HEADERS = 64


def busy(retry_low: int = 2, retry_high: int = 10) -> ServerBusy:
    """503 with a Retry-After spread over a range: clients told to wait must not all come back at one instant."""
    return ServerBusy("the server is busy; retry later", retry_after=random.randint(retry_low, retry_high))  # noqa: S311


def raw_error(e: ApiError) -> bytes:
    """A whole HTTP/1.1 response for ``e``, for answering below aiohttp's handlers (then the connection closes)."""
    body = json.dumps({"error": e.to_json()}).encode()
    retry = f"Retry-After: {e.retry_after}\r\n" if e.retry_after is not None else ""
    head = (
        f"HTTP/1.1 {e.status} {_REASONS.get(e.status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n"
    )
    return head.encode() + body


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Unavailable"}


class AdmissionGate:
    """At most ``limit`` at once, at most ``queue`` waiting (each for at most ``wait`` seconds); others: 503."""

    def __init__(self, name: str, limit: int, queue: int, wait: float = 5.0) -> None:
        self.name, self.limit, self.queue, self.wait = name, limit, queue, wait
        self._sem = asyncio.Semaphore(limit)
        self.waiting = 0
        self.refused = 0

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.queue:
            self.refused += 1
            raise busy()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait):
                await self._sem.acquire()
        except TimeoutError:
            self.refused += 1
            raise busy() from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


class Connections:
    """The open connections of one instance and their request clocks (swept once a second)."""

    def __init__(self, max_connections: int) -> None:
        self.max = max_connections
        self.max_anonymous = max(1, max_connections // 4)
        self.open: set[GuardedHandler] = set()
        self.anonymous = 0
        self.streams = 0  # connections to the process server's port (server/process/receiver.py), in every phase
        self.streams_unverified = 0  # ... of which not past their TLS handshake and HELLO yet
        self.refused = 0
        self.timed_out = 0

    def full(self) -> bool:
        return len(self.open) + self.streams >= self.max

    def sweep(self, now: float) -> None:
        """Close connections whose request is overdue (a slow client holding a connection)."""
        for handler in list(self.open):
            if handler.request_started is not None and now - handler.request_started > HEADER_SECONDS:
                self.timed_out += 1
                handler.abort(RequestTimeout(f"the request did not arrive within {HEADER_SECONDS:g} s"))


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the limits above."""

    connections: Connections

    def __init__(self, *args: Any, connections: Connections, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections = connections
        self.request_started: float | None = None
        self.handling = False
        self.anonymous = True
        self._guard_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard_transport = transport
        # Past the TLS handshake: whether the peer holds one of our client certificates is known already.
        self.anonymous = not transport.get_extra_info("peercert")
        c = self.connections
        if c.full() or (self.anonymous and c.anonymous >= c.max_anonymous):
            c.refused += 1
            self.abort(busy())
            return
        c.open.add(self)
        c.anonymous += self.anonymous
        self.request_started = time.monotonic()  # the first request is due as any other: within HEADER_SECONDS

    def connection_lost(self, exc: BaseException | None) -> None:
        if self in self.connections.open:
            self.connections.open.discard(self)
            self.connections.anonymous -= self.anonymous
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.request_started is None and not self.handling:  # a body being read has its own deadline
            self.request_started = time.monotonic()
        super().data_received(data)
        if self._messages:
            # The line and headers are in: the client was not slow. The clock stops here, not when a handler
            # starts: a loop busy with a burst of handshakes must not turn requests it has not reached yet into
            # 408s of its own making (and reconnections that cost more handshakes).
            self.request_started = None
            self.handling = True

    def request_arrived(self) -> None:
        """Called as a request reaches the handlers: its line and headers are in, the clock stops."""
        self.request_started = None
        self.handling = True

    def request_done(self) -> None:
        self.handling = False

    def abort(self, e: ApiError) -> None:
        transport = self._guard_transport
        self.request_started = None
        if transport is None or transport.is_closing():
            return
        write = getattr(transport, "write", None)  # uvloop's TLS transport is not an asyncio.WriteTransport subclass
        if write is not None:
            write(raw_error(e))
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or a handler aiohttp gave up on) answers JSON with a stable ID."""
        self.request_started = None
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong) or "Too many headers" in str(exc or "") or "Header" in str(message or ""):
            e: ApiError = HeadersTooLarge(f"the request line or headers are too large ({message or exc})"[:300])
        else:
            e = BadRequest(f"the request is not well-formed HTTP ({message or exc})"[:300])
        resp = web.json_response({"error": e.to_json()}, status=e.status)
        resp.force_close()
        return resp


class GuardedSite(web.TCPSite):
    """A TCPSite whose connections are GuardedHandlers, with a bounded TLS handshake."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, connections: Connections, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        kwargs = dict(server._kwargs)  # the runner's handler settings (access log, keep-alive...)

        def factory() -> GuardedHandler:
            return GuardedHandler(server, loop=loop, connections=self.connections, **kwargs)

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            ssl_handshake_timeout=HANDSHAKE_SECONDS if self._ssl_context else None,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


async def read_body(request: web.Request) -> bytes:
    """The body, within BODY_SECONDS (a client trickling it gets 408 and loses the connection)."""
    try:
        async with asyncio.timeout(BODY_SECONDS):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {BODY_SECONDS:g} s") from None
