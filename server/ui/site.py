"""The dashboard's listener: its pages, their JSON, the changes, /metrics, and the jobs that keep its snapshot.

One listener of its own (``serve --ui-listen``, loopback by default; ``none`` turns it off), plain HTTP on loopback
and TLS with the server's certificate anywhere else (server/ui/access.py says who may use it). The pages are one
HTML shell each and a script (static/app.js) that renders their JSON and fetches it again every refresh, so they
live without a reload; everything they load ships in the package (static/, with uPlot's licence in
static/vendor/uplot/). The database is read in a pool of two threads of the dashboard's own: its work never waits
behind the API's, nor delays it, and the event loop never blocks on it. The fleet is read once per refresh into a
snapshot (server/ui/snapshot.py) that every request and scrape reads; a request's own reads are by key."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import html
import json
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar
from urllib.parse import quote

from aiohttp import web

from agent.shared.errors import MobilityError
from agent.shared.textsafe import printable
from server import __version__
from server.api.metrics import HEARTBEAT_BUCKETS
from server.api.nonces import load_or_create_key
from server.api.tls import listener_context
from server.database.operators import Operators
from server.database.rollout_rows import FAILED, OFFERED, RUNNING, SKIPPED, SUCCEEDED, WAITING, WITHDRAWN, Rollout
from server.errors import (
    ApiError,
    BadRequest,
    BodyTooLarge,
    DatabaseUnavailable,
    ListenFailed,
    MachineNotFound,
    NotFound,
    ServerInternal,
    UiLoginRequired,
)
from server.process.service import store_dir
from server.process.store import DEFAULT_RESERVE, ChunkStore, Point
from server.releases.rollouts import Rollouts
from server.ui import views
from server.ui.access import SESSION_COOKIE, Access, Who, is_loopback
from server.ui.actions import Actions
from server.ui.exposition import fleet_text
from server.ui.history import History
from server.ui.snapshot import Builder, DiskQuery, MachineQuery, Snapshot, StoreFigures

if TYPE_CHECKING:
    from server.api.edge import Connections
    from server.api.metrics import ServerMetrics
    from server.api.stalls import StallMonitor
    from server.database.storage import Storage
    from server.datadir import DataDir

log = logging.getLogger("mobility.server.ui")


class Serving(Protocol):
    """What the dashboard reads of the serving instance it runs in (server/api/app.py's ``Server``, which starts it: the
    dashboard never imports the API it sits beside)."""

    @property
    def data(self) -> DataDir: ...
    @property
    def storage(self) -> Storage: ...
    @property
    def metrics(self) -> ServerMetrics: ...
    @property
    def connections(self) -> Connections: ...
    @property
    def stalls(self) -> StallMonitor: ...
    def clock(self) -> float: ...


DEFAULT_PORT = 9445
DEFAULT_REFRESH = 10.0
DEFAULT_SESSION = 12 * 3600.0
MAX_BODY = 16 * 1024
PRUNE_SECONDS = 600.0
UI_THREADS = 2
FIRST_SNAPSHOT_WAIT = 20.0  # seconds a request waits for the first snapshot after the server started
SCRAPED_LATELY = 120.0  # seconds: while /metrics is scraped this often, each snapshot's text is written with it
P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PAGES = {
    "overview": "Overview",
    "machines": "Machines",
    "machine": "Machine",
    "protection": "Protection and points",
    "rollouts": "Rollouts",
    "rollout": "Rollout",
    "audit": "Audit log",
    "login": "Log in",
}
PAGE_PATHS = (
    ("/", "overview"),
    ("/machines", "machines"),
    ("/machines/{host_id}", "machine"),
    ("/protection", "protection"),
    ("/rollouts", "rollouts"),
    ("/rollouts/{rollout_id}", "rollout"),
    ("/audit", "audit"),
)
NAV = (("/", "Overview"), ("/machines", "Machines"), ("/protection", "Protection"), ("/rollouts", "Rollouts"),
       ("/audit", "Audit log"))  # fmt: skip
STATIC = {
    "app.js": "application/javascript",
    "style.css": "text/css",
    "vendor/uplot/uPlot.iife.min.js": "application/javascript",
    "vendor/uplot/uPlot.min.css": "text/css",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # not "no-referrer": with it a form's POST says Origin: null
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class UiOptions:
    host: str
    port: int = DEFAULT_PORT
    refresh: float = DEFAULT_REFRESH  # seconds between fleet snapshots (and between a page's fetches)
    session_seconds: float = DEFAULT_SESSION
    database: str | None = None  # `serve --database`, for the test failovers the dashboard starts
    reserve: int = DEFAULT_RESERVE  # the store's reserve of free space (`serve --store-reserve`)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def _load_static() -> dict[str, bytes]:
    root = resources.files("server.ui") / "static"
    return {name: (root / name).read_bytes() for name in STATIC}


class Ui:
    """The dashboard of one serving instance."""

    def __init__(self, server: Serving, options: UiOptions) -> None:
        self.server = server
        self.options = options
        self.storage = server.storage
        self.operators = Operators(server.storage)
        self.pool = ThreadPoolExecutor(UI_THREADS, thread_name_prefix="ui")
        self.access = Access(
            server.storage,
            self.operators,
            load_or_create_key(server.data.nonce_key),
            loopback=options.loopback,
            session_seconds=options.session_seconds,
            offload=self.offload,
            clock=server.clock,
        )
        self.actions = Actions(server.storage, self.operators, server.data, options.database, server.clock)
        self.builder = Builder()
        self.history = History(HEARTBEAT_BUCKETS)
        self.snapshot: Snapshot | None = None
        self._first = asyncio.Event()
        self._store: ChunkStore | None = None
        self._store_lock = threading.Lock()
        self._failed: str | None = None  # why the last snapshot could not be made
        self._counted: dict[str, tuple[float, dict[str, int]]] = {}  # rollout ID -> (its updated_at, its counts)
        self.static = _load_static()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._scraped: tuple[float, bool] = (-SCRAPED_LATELY, False)  # the last scrape: when, and whether gzipped

    async def offload(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    # The snapshot -------------------------------------------------------------------------------------------------

    def store(self) -> ChunkStore | None:
        """A reader of the chunk store on this machine (None on an instance without one). Its one connection is
        used by one thread at a time (``_store_lock``)."""
        if self._store is None and (store_dir(self.server.data) / "index.db").exists():
            with contextlib.suppress(MobilityError):
                self._store = ChunkStore(store_dir(self.server.data))
        return self._store

    def points(self, host_id: str, limit: int) -> list[Point]:
        """A machine's newest points (none on an instance without the store)."""
        with self._store_lock:
            store = self.store()
            return store.recent_points(host_id, limit) if store is not None else []

    def build(self) -> Snapshot:
        """Read the fleet (a worker thread): one query of the database, one of the store's index, the rollouts."""
        start = time.perf_counter()
        rows = self.storage.fleet()
        newest: dict[str, float] = {}
        figures = None
        with self._store_lock:
            store = self.store()
            if store is not None:
                newest = store.newest_points()
                used, free, size = store.footprint()
                figures = StoreFigures(used, free, size, self.options.reserve)
        rollouts = self._rollouts(Rollouts(self.storage))
        now = self.server.clock()
        return self.builder.build(
            rows,
            now,
            newest_points=newest,
            store=figures,
            rollouts=rollouts,
            build_seconds=time.perf_counter() - start,
        )

    def _rollouts(self, source: Rollouts) -> list[tuple[Rollout, dict[str, int]]]:
        """The newest rollouts and their machines by state: counted again only while a rollout runs (or when it
        changed since it was counted); a finished one's machines no longer move."""
        newest = source.newest(views.ROLLOUTS)
        stale = [
            r.rollout_id
            for r in newest
            if r.state == RUNNING or self._counted.get(r.rollout_id, (None,))[0] != r.updated_at
        ]
        fresh = source.counts(stale)
        self._counted = {
            r.rollout_id: (
                r.updated_at,
                fresh[r.rollout_id] if r.rollout_id in fresh else self._counted[r.rollout_id][1],
            )
            for r in newest
        }
        return [(r, self._counted[r.rollout_id][1]) for r in newest]

    def _build_and_sample(self) -> Snapshot:
        snap = self.build()
        buckets, _ = self.server.metrics.heartbeat_latencies()
        with self.history.lock:
            self.history.sample(snap, buckets, snap.taken_at)
        if time.monotonic() - self._scraped[0] < SCRAPED_LATELY:  # Prometheus is scraping: have its text ready
            _fleet_body(snap, self._scraped[1])
        return snap

    async def refresh(self) -> None:
        try:
            self.snapshot = await self.offload(self._build_and_sample)
        except MobilityError as e:
            self._failed = e.message
            raise
        self._failed = None
        self._first.set()

    async def current(self) -> Snapshot:
        """The newest snapshot; before the first one, wait for it a while (503 if the fleet cannot be read)."""
        if self.snapshot is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), FIRST_SNAPSHOT_WAIT)
        if self.snapshot is None:
            why = f": {self._failed}" if self._failed else ""
            raise DatabaseUnavailable(f"the dashboard could not read the fleet yet{why}", retry_after=5)
        return self.snapshot

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]], *, first: bool = False) -> None:
        if not first:
            await asyncio.sleep(seconds)
        while True:
            try:
                await job()
            except MobilityError as e:
                log.warning("dashboard job failed: %s: %s", e.id, e.message)
            except Exception:
                log.exception("dashboard job failed")
            await asyncio.sleep(seconds)

    async def _prune(self) -> None:
        await self.offload(self.operators.prune, self.server.clock())

    # Serving --------------------------------------------------------------------------------------------------------

    async def start(self) -> int:
        app = self.app()
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        context = None if self.options.loopback else self._tls()
        site = web.TCPSite(self.runner, self.options.host, self.options.port, ssl_context=context)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise ListenFailed(f"cannot listen on {self.options.host}:{self.options.port}: {e.strerror}") from e
        self.port = self.runner.addresses[0][1] if self.runner.addresses else self.options.port
        self._tasks = [
            asyncio.create_task(self._every(self.options.refresh, self.refresh, first=True)),
            asyncio.create_task(self._every(PRUNE_SECONDS, self._prune)),
        ]
        scheme = "http" if self.options.loopback else "https"
        access = "loopback, no login" if self.options.loopback else "operators log in"
        log.info("dashboard and /metrics on %s://%s:%d (%s)", scheme, self.options.host, self.port, access)
        return self.port

    def _tls(self) -> ssl.SSLContext:
        data = self.server.data
        # Optional: an operator's certificate logs in; a browser without one gets the form.
        return listener_context(data.tls_cert, data.tls_key, data.ca_cert, ssl.CERT_OPTIONAL)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.actions.close()
        if self.runner is not None:
            await self.runner.cleanup()
        self.pool.shutdown(wait=True)
        if self._store is not None:
            self._store.close()

    # The application ----------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY)
        r = app.router
        for path, page in PAGE_PATHS:
            r.add_get(path, functools.partial(self.page, page))
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/static/{name:.+}", self.static_file)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/overview", self.api(self._overview))
        r.add_get("/api/machines", self.api(self._machines))
        r.add_get("/api/machines/{host_id}", self.api(self._machine))
        r.add_get("/api/protection", self.api(self._protection))
        r.add_get("/api/rollouts", self.api(self._rollouts_page))
        r.add_get("/api/rollouts/{rollout_id}", self.api(self._rollout))
        r.add_get("/api/audit", self.api(self._audit))
        r.add_post("/api/machines/{host_id}/pause", self.change(self._pause))
        r.add_post("/api/machines/{host_id}/resume", self.change(self._resume))
        r.add_post("/api/machines/{host_id}/test-failover", self.change(self._test_failover))
        r.add_post("/api/rollouts/halt", self.change(self._halt))
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            response = await self._answer(request, handler)
            status = response.status
            return response
        except web.HTTPException as e:  # a redirect (the errors are answered by _answer)
            status = e.status
            raise
        finally:
            route = request.match_info.route.resource
            self.server.metrics.requests.labels(
                "ui " + (route.canonical if route is not None else "unmatched"), request.method[:8], str(status)
            ).inc()

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self.access.check_host(request)
            response = await handler(request)
        except ApiError as e:
            response = _error(e)
        except MachineNotFound as e:  # the page's machine (a host ID in its path) is not registered (any more)
            response = web.json_response({"error": e.to_json()}, status=404)
        except MobilityError as e:  # a refusal of the change itself (not protected, no rollout running): a conflict
            response = web.json_response({"error": e.to_json()}, status=409)
        except web.HTTPRequestEntityTooLarge:
            response = _error(BodyTooLarge(f"the body is larger than {MAX_BODY} bytes"))
        except web.HTTPNotFound:
            response = _error(NotFound(f"no page {printable(request.path, 100)}"))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = _error(BadRequest(f"HTTP {e.status}: {e.reason}"))
        except Exception:
            log.exception("%s %s failed", request.method, printable(request.path, 100))
            response = _error(ServerInternal("the dashboard could not answer this request"))
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _who(self, request: web.Request) -> Who:
        who = await self.access.who(request)
        if who is None:
            raise UiLoginRequired("log in to use the dashboard")
        return who

    def api(self, view: Callable[[web.Request, Who], Awaitable[Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            who = await self._who(request)
            doc = await view(request, who)
            if doc is None:
                raise NotFound(f"no such thing: {printable(request.path, 100)}")
            if "taken_at" in doc:  # how old the figures are, on the server's clock (not the browser's)
                doc["age_seconds"] = max(0.0, self.server.clock() - doc["taken_at"])
            return web.json_response(doc)

        return handler

    def change(self, action: Callable[[web.Request, Who, dict[str, Any]], Awaitable[Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            who = await self._who(request)
            self.access.check_change(request, who)
            body = await _json_body(request)
            return web.json_response(await action(request, who, body))

        return handler

    # Pages --------------------------------------------------------------------------------------------------------

    async def page(self, page: str, request: web.Request) -> web.StreamResponse:
        who = await self.access.who(request)
        if who is None:
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs[:500], safe='')}")
        response = web.Response(content_type="text/html", charset="utf-8")
        browser = self.access.set_browser(request, response)
        if who.via == "loopback":
            who = Who(who.operator, who.via, self.access.csrf_for("browser", browser), who.address)
        response.text = self._shell(page, who, self.access.page_csrf(who, browser), request.match_info)
        return response

    def _shell(self, page: str, who: Who | None, csrf: str, match: Any, error: str | None = None) -> str:
        e = html.escape
        ident = match.get("host_id") or match.get("rollout_id") or ""
        nav = "".join(f'<a href="{path}">{e(title)}</a>' for path, title in NAV) if who is not None else ""
        if who is None:
            user = ""
        elif who.via == "loopback":
            user = '<span class="who">loopback (no login) · <a href="/login">log in</a></span>'
        else:
            user = f'<span class="who">{e(who.operator)} · <button id="logout" type="button">log out</button></span>'
        body = ""
        if page == "login":
            body = (
                '<form id="login" method="post" action="/login" class="login">'
                f'<input type="hidden" name="csrf" value="{e(csrf)}">'
                f'<input type="hidden" name="next" value="{e(str(match.get("next", "/")))}">'
                '<label>Operator token <input type="password" name="token" autocomplete="off" required></label>'
                '<button type="submit">Log in</button>'
                + (f'<p class="error" id="login-error">{e(error)}</p>' if error else "")
                + "<p>An operator gets a token from <code>mobility-server operator add NAME</code>; an operator "
                "client certificate logs in without one.</p></form>"
            )
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Mobility · {e(PAGES[page])}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f'<meta name="csrf-token" content="{e(csrf)}">'
            f'<meta name="refresh-seconds" content="{self.options.refresh:g}">'
            '<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">'
            '<link rel="stylesheet" href="/static/style.css">'
            f'</head><body data-page="{e(page)}" data-id="{e(ident)}">'
            f'<header><a class="brand" href="/">Mobility</a><nav>{nav}</nav>{user}</header>'
            f'<main id="app">{body or "<p class=loading>Loading…</p>"}</main>'
            f'<footer>mobility-server {e(__version__)} · <span id="updated"></span></footer>'
            '<script src="/static/vendor/uplot/uPlot.iife.min.js"></script><script src="/static/app.js"></script>'
            "</body></html>\n"
        )

    async def login_page(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        response = web.Response(content_type="text/html", charset="utf-8", status=status)
        browser = self.access.set_browser(request, response)
        target = _next(request.query.get("next", "/"))
        response.text = self._shell("login", None, self.access.csrf_for("browser", browser), {"next": target}, error)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token, csrf, target = str(form.get("token", "")), str(form.get("csrf", "")), _next(str(form.get("next", "/")))
        self.access.check_change(request, None, given=csrf)
        try:
            name, session, ends = await self.access.login(request, token)
        except ApiError as e:
            return await self.login_page(request, f"{e.id}: {e.message}", e.status)
        log.info("operator %s logged in to the dashboard from %s", printable(name, 100), request.remote)
        response = web.Response(status=303, headers={"Location": target})
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(ends - self.server.clock()),
            httponly=True,
            secure=not self.options.loopback,
            samesite="Strict",
            path="/",
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        who = await self._who(request)
        self.access.check_change(request, who)
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            await self.offload(self.operators.close_session, session)
        response = web.json_response({"logged_out": who.operator})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = self.static.get(name)
        if body is None:
            raise NotFound(f"no file {printable(name, 100)}")
        return web.Response(
            body=body, content_type=STATIC[name], headers={"Cache-Control": "max-age=3600, must-revalidate"}
        )

    # /metrics -----------------------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        await self._who(request)
        snap = await self.current()
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
        self._scraped = (time.monotonic(), gzipped)
        fleet = await self.offload(_fleet_body, snap, gzipped)
        own = self.server.metrics.exposition()
        body = (gzip.compress(own, 1) + fleet) if gzipped else own + fleet  # gzip members concatenate
        headers = {"Content-Encoding": "gzip"} if gzipped else {}
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8", **headers})

    # The JSON of the pages ------------------------------------------------------------------------------------------

    def _instance(self) -> dict[str, Any]:
        _, count = self.server.metrics.heartbeat_latencies()
        c = self.server.connections
        stalls = self.server.stalls.total
        return {
            "heartbeats": count,
            "connections": len(c.open),
            "loop_stall_p99_ms": stalls.percentile(0.99),
            "loop_stall_max_ms": stalls.worst_ms,
            "who": None,
        }

    async def _overview(self, request: web.Request, who: Who) -> Any:
        snap = await self.current()
        instance = self._instance() | {"who": who.operator}
        return await self.offload(views.overview, snap, self.history, self.storage, instance)

    async def _machines(self, request: web.Request, who: Who) -> Any:
        query = MachineQuery.parse(request.query)
        snap = await self.current()
        return await self.offload(views.machines, snap, query)

    async def _machine(self, request: web.Request, who: Who) -> Any:
        host_id = request.match_info["host_id"][:64]
        snap = await self.current()
        doc = await self.offload(views.machine, snap, self.history, self.storage, self.points, host_id)
        if doc is not None:
            running = self.actions.running
            doc["test_failover_running"] = running is not None and running.host_id == host_id
        return doc

    async def _protection(self, request: web.Request, who: Who) -> Any:
        query = DiskQuery.parse(request.query)
        snap = await self.current()
        running = self.actions.running
        now = {"host_id": running.host_id, "started": running.started} if running else None
        return await self.offload(views.protection, snap, self.storage, query, now)

    async def _rollouts_page(self, request: web.Request, who: Who) -> Any:
        return views.rollouts(await self.current())

    async def _rollout(self, request: web.Request, who: Who) -> Any:
        q = request.query
        state = q.get("state") or None
        if state is not None and state not in ROLLOUT_MEMBER_STATES:
            raise BadRequest(f"state: one of {', '.join(ROLLOUT_MEMBER_STATES)}")
        offset = _int(q.get("offset"), 0, 10**7, 0, "offset")
        limit = _int(q.get("limit"), 1, 500, 100, "limit")
        rollout_id = request.match_info["rollout_id"][:64]
        return await self.offload(views.rollout, self.storage, rollout_id, (state,) if state else (), offset, limit)

    async def _audit(self, request: web.Request, who: Who) -> Any:
        limit = _int(request.query.get("limit"), 1, 1000, 200, "limit")
        entries = await self.offload(self.operators.audit_log, limit)
        return {"entries": [e.to_json() for e in entries]}

    # Changes --------------------------------------------------------------------------------------------------------

    async def _pause(self, request: web.Request, who: Who, body: dict[str, Any]) -> Any:
        host_id = request.match_info["host_id"][:64]
        return {"outcome": await self.offload(self.actions.set_paused, who, host_id, True)}

    async def _resume(self, request: web.Request, who: Who, body: dict[str, Any]) -> Any:
        host_id = request.match_info["host_id"][:64]
        return {"outcome": await self.offload(self.actions.set_paused, who, host_id, False)}

    async def _test_failover(self, request: web.Request, who: Who, body: dict[str, Any]) -> Any:
        host_id = request.match_info["host_id"][:64]
        entry = await self.actions.start_test_failover(who, host_id, self.offload)
        return {"started": True, "audit_entry": entry}

    async def _halt(self, request: web.Request, who: Who, body: dict[str, Any]) -> Any:
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise BadRequest("reason: text")
        return {"outcome": await self.offload(self.actions.halt, who, reason)}


ROLLOUT_MEMBER_STATES = (WAITING, OFFERED, SUCCEEDED, FAILED, SKIPPED, WITHDRAWN)


def _fleet_body(snap: Snapshot, gzipped: bool) -> bytes:
    """The fleet's part of /metrics, made once per snapshot (and compressed once, if asked for)."""
    key = "gzip" if gzipped else "text"
    found = snap.exposition.get(key)
    if found is None:
        text = snap.exposition.get("text")
        if text is None:
            text = snap.exposition["text"] = fleet_text(snap)
        found = snap.exposition[key] = gzip.compress(text, 1) if gzipped else text
    return found


def _error(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
    return web.json_response({"error": e.to_json()}, status=e.status, headers=headers)


def _next(target: str) -> str:
    """Where a login goes on: a path of this site only (never another site: an open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _int(text: str | None, low: int, high: int, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or len(text) > 8 or not low <= int(text) <= high:
        raise BadRequest(f"{name}: a whole number from {low} to {high}")
    return int(text)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadRequest("the body is not JSON") from e
    if not isinstance(doc, dict):
        raise BadRequest("the body is not a JSON object")
    return doc
