"""The server's TLS, for each of its listeners (the API, the process server's streams, the dashboard off loopback):
one way to make a listener's context, and one way to read who a verified client certificate names."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def listener_context(cert: Path | str, key: Path | str, ca_cert: Path | str, verify: ssl.VerifyMode) -> ssl.SSLContext:
    """A listener with the server's certificate that verifies client certificates against our CA: required
    (``CERT_REQUIRED``: replication streams) or optional (``CERT_OPTIONAL``: enrolment comes before the machine has
    a certificate; a browser without an operator's certificate gets the login form)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(ca_cert))
    ctx.verify_mode = verify
    return ctx


def peer_identity(cert: dict[str, Any] | None) -> tuple[str, str] | None:
    """The common name and serial number of a client certificate the TLS layer verified against our CA (as
    ``getpeercert()`` gives it), or None when there is none or it names no one."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value), str((cert or {}).get("serialNumber", ""))
    return None
