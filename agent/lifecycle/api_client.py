"""Talking to the configuration server: pinning its CA, and JSON over (mutual) TLS."""

from __future__ import annotations

import http.client
import json
import logging
import re
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.errors import (
    FingerprintInvalid,
    FingerprintMismatch,
    RemoteBusy,
    RemoteError,
    ServerProtocolError,
    ServerUnreachable,
)
from agent.shared import wire
from agent.shared.address import ServerAddress
from agent.shared.textsafe import printable

log = logging.getLogger("mobility.transport")

CA_PATH = f"{wire.API}/ca"
_FINGERPRINT = re.compile(r"^sha256:([0-9a-f]{64})$")
MAX_RESPONSE = 16 * 1024 * 1024


def parse_fingerprint(text: str) -> str:
    m = _FINGERPRINT.match(text.strip().lower())
    if not m:
        raise FingerprintInvalid(f"{text!r} is not sha256:<64 hex digits>")
    return f"sha256:{m.group(1)}"


def ca_fingerprint(ca_pem: bytes) -> str:
    return "sha256:" + x509.load_pem_x509_certificate(ca_pem).fingerprint(hashes.SHA256()).hex()


def _wrap_errors(server: ServerAddress, e: Exception) -> Exception:
    if isinstance(e, ssl.SSLCertVerificationError):
        return FingerprintMismatch(
            f"{server}: the server's certificate does not verify against the pinned CA ({e.verify_message})"
        )
    if isinstance(e, (OSError, http.client.HTTPException)):
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return ServerUnreachable(f"cannot reach the configuration server at {server}: {reason}")
    return e


class Client:
    """JSON over HTTPS to one server; with ``ca_pem`` it verifies the server, with ``client`` it authenticates."""

    def __init__(
        self,
        server: ServerAddress,
        ca_pem: bytes | None,
        client: tuple[Path, Path] | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.server = server
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode() if ca_pem else None)
        if ca_pem is None:
            # Only to fetch the CA itself, which is then checked against the pinned fingerprint.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        self.context = ctx
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None
        self.retry_after: float | None = None  # the last answer's Retry-After (seconds), if it had one

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def raw(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one retry on a kept-alive connection the server closed meanwhile
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    self.server.host, self.server.port, context=self.context, timeout=self.timeout
                )
            try:
                self._conn.request(
                    method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
                )
                resp = self._conn.getresponse()
                self.retry_after = _retry_after(resp.getheader("Retry-After"))
                data = resp.read(MAX_RESPONSE + 1)
                if len(data) > MAX_RESPONSE:
                    raise ServerProtocolError(f"{self.server}{path}: response larger than {MAX_RESPONSE} bytes")
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt:
                    raise _wrap_errors(self.server, e) from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise _wrap_errors(self.server, e) from e
        raise AssertionError("unreachable")

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
    ) -> dict[str, Any]:
        payload = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
        status, data = self.raw(method, path, payload, headers)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ServerProtocolError(f"{self.server}{path}: HTTP {status}, not JSON") from e
        if not isinstance(doc, dict):
            raise ServerProtocolError(f"{self.server}{path}: HTTP {status}, not a JSON object")
        if status >= 400:
            err = doc.get("error")
            if isinstance(err, dict) and isinstance(err.get("code"), str):
                # What a server says is shown on a terminal and logged: bounded and without control characters.
                code = printable(err["code"], 64)
                message = printable(str(err.get("message", "")), 2000)
                fix = printable(str(err.get("fix", "")), 1000)
                if status in (429, 503):  # busy or rate limited: temporary, retried after what the server said
                    raise RemoteBusy(code, message, fix, status=status, retry_after=self.retry_after)
                raise RemoteError(code, message, fix)
            raise ServerProtocolError(f"{self.server}{path}: HTTP {status}")
        return doc


MAX_RETRY_AFTER = 3600.0


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta form the server sends), bounded; None when absent or not a number."""
    if value is None or not value.strip().isdigit():
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER)


def fetch_pinned_ca(server: ServerAddress, pinned: str | None, timeout: float = 15.0) -> bytes:
    """The server's CA certificate, checked against the pinned fingerprint (or trusted on first use, loudly)."""
    client = Client(server, None, timeout=timeout)
    try:
        status, data = client.raw("GET", CA_PATH)
    finally:
        client.close()
    if status != 200 or b"BEGIN CERTIFICATE" not in data:
        raise ServerProtocolError(f"{server}{CA_PATH}: HTTP {status}, no CA certificate")
    try:
        got = ca_fingerprint(data)
    except ValueError as e:
        raise ServerProtocolError(f"{server}{CA_PATH}: the CA certificate does not parse") from e
    if pinned is None:
        log.warning(
            "TRUST ON FIRST USE: no --cs-fingerprint given; trusting the server at %s with CA %s. "
            "Compare it with `mobility-server init`'s output.",
            server,
            got,
        )
    elif got != pinned:
        raise FingerprintMismatch(f"{server} presents CA {got}, but {pinned} is pinned")
    return data
