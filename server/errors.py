"""Errors of the configuration server; each carries the HTTP status it is answered with."""

from __future__ import annotations

from typing import ClassVar

from agent.errors import LocalSystemError, RemoteStateError, UsageError


class ApiError(RemoteStateError):
    """An error answered over HTTP as ``{"error": {"code", "message", "fix"}}``."""

    status: ClassVar[int] = 400


class BadRequest(ApiError):
    code = "BAD-REQUEST"
    remediation = "Send a JSON object with the fields the API documents (agent and server versions must match)."


class BodyTooLarge(ApiError):
    code = "BODY-TOO-LARGE"
    status = 413
    remediation = "Requests to the API are small JSON documents; send less than 64 KiB."


class NonceInvalid(ApiError):
    code = "ENROL-NONCE-INVALID"
    status = 401
    remediation = "Ask for a fresh nonce and enrol again; each nonce is single-use and expires after 5 minutes."


class BadProof(ApiError):
    code = "ENROL-BAD-PROOF"
    status = 401
    remediation = "Use the current passphrase (`mobility-server passphrase show` on the server) or a valid token."


class TokenExpired(ApiError):
    code = "ENROL-TOKEN-EXPIRED"
    status = 401
    remediation = "Create a new token with `mobility-server token create --ttl ...`."


class TokenUsedUp(ApiError):
    code = "ENROL-TOKEN-USED-UP"
    status = 401
    remediation = "The token reached its use count; create a new one with `mobility-server token create --uses N`."


class RateLimited(ApiError):
    code = "ENROL-RATE-LIMITED"
    status = 429
    remediation = "Too many failed proofs from this address; wait for Retry-After seconds, then use the right secret."


class CsrInvalid(ApiError):
    code = "CSR-INVALID"
    remediation = "Send a PEM certificate request with an EC P-256 key, signed by that key."


class HostMismatch(ApiError):
    code = "HOST-ID-MISMATCH"
    status = 403
    remediation = "A machine can act only for its own host ID (its certificate's CN); use that machine's identity."


class ClientCertRequired(ApiError):
    code = "CLIENT-CERT-REQUIRED"
    status = 401
    remediation = "Register the machine first (`mobility configure`); this call needs its client certificate."


class UnknownMachine(ApiError):
    code = "MACHINE-UNKNOWN"
    status = 404
    remediation = "The machine is not registered (or was removed); run `mobility configure` again."


class NotFound(ApiError):
    code = "NOT-FOUND"
    status = 404
    remediation = "Check the URL: the API lives under /v1."


class DataDirInitialised(UsageError):
    code = "DATA-DIR-INITIALISED"
    remediation = "The directory already holds a server; use it as it is, or pass --data an empty directory."


class DataDirNotInitialised(UsageError):
    code = "DATA-DIR-NOT-INITIALISED"
    remediation = "Run `mobility-server init --data DIR` first, or pass the --data of an initialised server."


class DataDirPermissions(LocalSystemError):
    code = "DATA-DIR-PERMISSIONS"
    remediation = "Make the data directory and its keys private to the server's user: chmod 700 DIR; chmod 600 keys."


class DatabaseCorrupt(LocalSystemError):
    code = "DB-CORRUPT"
    remediation = "Restore mobility.db from a backup (stop the server first), or move it aside to start empty."


class ListenFailed(LocalSystemError):
    code = "LISTEN-FAILED"
    remediation = "Choose another --listen HOST:PORT, or stop whatever holds the port (ss -ltnp)."


class BadDuration(UsageError):
    code = "BAD-DURATION"
    remediation = "Give durations as a number and a unit: 30m, 12h, 7d."
