"""Who is asking the dashboard, and whether a change they ask for really comes from its own pages.

- On a loopback listener anyone who can connect is the machine's own user: no login (a login is still possible, and
  then the audit log names the operator). The ``Host`` header must be a loopback name, so a web page that rebinds
  its DNS name to 127.0.0.1 cannot read the dashboard through the browser of someone on this machine.
- On any other address (served over TLS with the server's certificate) a request needs an operator: a session
  opened with a token on the login page (a cookie: HttpOnly, Secure, SameSite=Strict), an operator's client
  certificate (made by `operator add --cert-out`, known by its fingerprint), or ``Authorization: Bearer TOKEN``
  (scripts and Prometheus). Failed logins are limited per source address, as enrolment proofs are.
- Every change (a POST) must carry the CSRF token of the page that asks (``X-CSRF-Token``), which is an HMAC of the
  client's session (or its loopback cookie) under a key derived from the data directory's nonce key, so every
  instance sharing the directory computes the same; and a browser's ``Origin`` (or ``Sec-Fetch-Site``) must be this
  site. Bearer requests need no CSRF token: no browser attaches that header on its own."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from server.database.operators import Operators
from server.database.storage import Storage
from server.errors import UiCsrfRefused, UiHostRefused, UiLoginFailed, UiLoginLimited

SESSION_COOKIE = "mobility_session"
BROWSER_COOKIE = "mobility_browser"  # a random value per browser: the CSRF token of a page without a session is its
CSRF_HEADER = "X-CSRF-Token"
LOGIN_FAILURES = 5  # within LOGIN_WINDOW seconds from one address, then UI-LOGIN-LIMITED
LOGIN_WINDOW = 60.0
_LOOPBACK_NAMES = ("localhost",)

R = TypeVar("R")
Offload = Callable[..., Awaitable[Any]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is a loopback address or name."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Who:
    operator: str  # the operator's name; "loopback" for an anonymous user of a loopback listener
    via: str  # loopback, session, certificate, bearer
    csrf: str | None  # what this client's changes must carry (None: bearer)
    address: str
    session_ends: float | None = None

    @property
    def described(self) -> str:
        """Where the audit log says a change came from."""
        how = {"loopback": "loopback, no login", "session": "session", "certificate": "client certificate",
               "bearer": "bearer token"}.get(self.via, self.via)  # fmt: skip
        return f"dashboard ({how}) from {self.address}"


class Access:
    def __init__(
        self,
        storage: Storage,
        operators: Operators,
        nonce_key: bytes,
        *,
        loopback: bool,
        session_seconds: float,
        offload: Offload,
        clock: Callable[[], float],
    ) -> None:
        self.storage = storage
        self.operators = operators
        self.key = hmac.new(nonce_key, b"mobility-ui-csrf-v1", hashlib.sha256).digest()
        self.loopback = loopback
        self.session_seconds = session_seconds
        self.offload = offload
        self.clock = clock

    def csrf_for(self, kind: str, secret: str) -> str:
        return hmac.new(self.key, f"{kind}\0{secret}".encode(), hashlib.sha256).hexdigest()

    def check_host(self, request: web.Request) -> None:
        """On loopback: the request must be addressed to a loopback name (DNS rebinding)."""
        if not self.loopback:
            return
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        if not is_loopback(host):
            raise UiHostRefused(f"this dashboard is served on loopback; {request.host[:100]!r} is not a loopback name")

    def browser(self, request: web.Request) -> str | None:
        value = request.cookies.get(BROWSER_COOKIE)
        return value if value and len(value) <= 64 else None

    def set_browser(self, request: web.Request, response: web.StreamResponse) -> str:
        """The browser's random cookie (made on its first page)."""
        value = self.browser(request)
        if value is None:
            value = secrets.token_urlsafe(24)
            response.set_cookie(
                BROWSER_COOKIE, value, httponly=True, samesite="Strict", secure=not self.loopback, path="/"
            )
        return value

    async def who(self, request: web.Request) -> Who | None:
        """The operator (or loopback user) making this request; None when it must log in first."""
        address = request.remote or "unknown"
        now = self.clock()
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            found = await self.offload(self.operators.session, session, now)
            if found is not None:
                return Who(found[0], "session", self.csrf_for("session", session), address, found[1])
        fingerprint = _client_fingerprint(request)
        if fingerprint is not None:
            name = await self.offload(self.operators.by_certificate, fingerprint, now)
            if name is not None:
                return Who(name, "certificate", self.csrf_for("certificate", fingerprint), address)
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer "):
            await self.offload(self._check_rate, address, now)
            name = await self.offload(self.operators.by_token, bearer[7:].strip())
            if name is None:
                await self.offload(self.storage.record_failure, _failure_key(address), now)
                raise UiLoginFailed("the bearer token is not an operator's")
            return Who(name, "bearer", None, address)
        if self.loopback:
            browser = self.browser(request)
            return Who("loopback", "loopback", self.csrf_for("browser", browser) if browser else None, address)
        return None

    def page_csrf(self, who: Who | None, browser: str) -> str:
        """The CSRF token a page gives its scripts: its session's, or (the login page, loopback) its browser's."""
        if who is not None and who.csrf is not None:
            return who.csrf
        return self.csrf_for("browser", browser)

    def check_change(self, request: web.Request, who: Who | None, given: str | None = None) -> None:
        """A POST: the page's CSRF token (``given``, else the header), from this site (UI-CSRF-REFUSED otherwise).
        Bearer requests pass."""
        if who is not None and who.via == "bearer":
            return
        origin = request.headers.get("Origin")
        scheme = "http" if self.loopback else "https"  # what this listener serves (uvloop's TLS hides it from aiohttp)
        if origin is not None and origin != f"{scheme}://{request.host}":
            raise UiCsrfRefused(f"a change asked from another site ({origin[:100]!r})")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise UiCsrfRefused("a change asked from another site (Sec-Fetch-Site)")
        expected = who.csrf if who is not None else None
        if expected is None:  # no session yet (the login form): the browser cookie's token
            browser = self.browser(request)
            expected = self.csrf_for("browser", browser) if browser else None
        given = given if given is not None else request.headers.get(CSRF_HEADER, "")
        if expected is None or not given or not hmac.compare_digest(given.encode()[:128], expected.encode()):
            raise UiCsrfRefused("the change does not carry this page's CSRF token")

    async def login(self, request: web.Request, token: str) -> tuple[str, str, float]:
        """A token from the login form: (operator, session cookie, when it ends); UI-LOGIN-FAILED or
        UI-LOGIN-LIMITED otherwise."""
        address = request.remote or "unknown"
        now = self.clock()
        await self.offload(self._check_rate, address, now)
        name = await self.offload(self.operators.by_token, token.strip())
        if name is None:
            await self.offload(self.storage.record_failure, _failure_key(address), now)
            raise UiLoginFailed("that is not an operator's token")
        session = await self.offload(self.operators.open_session, name, now, self.session_seconds)
        return name, session, now + self.session_seconds

    def _check_rate(self, address: str, now: float) -> None:
        count, oldest = self.storage.failures(_failure_key(address), now - LOGIN_WINDOW)
        if count >= LOGIN_FAILURES and oldest is not None:
            raise UiLoginLimited(
                f"{count} failed logins from {address} in the last {LOGIN_WINDOW:.0f} s",
                retry_after=int(oldest + LOGIN_WINDOW - now) + 1,
            )


def _failure_key(address: str) -> str:
    """Failed logins share enrolment's per-address table, under names of their own."""
    return f"ui:{address}"


def _client_fingerprint(request: web.Request) -> str | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return "sha256:" + hashlib.sha256(der).hexdigest() if der else None
