"""Enrolment nonces that any instance can check: signed by a key in the shared data directory, with their expiry
inside, so issuing one writes nothing. Single use is the database's job (server/database/tokens.py ``use_nonce``: the
used nonce's ID is a primary key), so a nonce issued by one instance and used at another is still used once."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.shared.fsutil import NotSmallRegularFile, read_small_file
from server.errors import NonceInvalid

KEY_BYTES = 32
_ID_BYTES = 12
_MAC_BYTES = 16
_LAYOUT = struct.Struct(f">{_ID_BYTES}sI")  # the ID and the expiry (seconds since the epoch)


@dataclass(frozen=True)
class Nonce:
    id: str
    expires_at: float


class NonceSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError("the nonce key is too short")
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, b"mobility-nonce-v1\0" + body, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, now: float, ttl: float) -> str:
        body = _LAYOUT.pack(secrets.token_bytes(_ID_BYTES), int(now + ttl))
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def check(self, nonce: str, now: float) -> Nonce:
        """The nonce's ID and expiry if this server signed it and it has not expired (NonceInvalid otherwise);
        whether it was used already is for the database to say."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError) as e:
            raise NonceInvalid("the nonce is not one this server issued") from e
        body, mac = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        if len(raw) != _LAYOUT.size + _MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            raise NonceInvalid("the nonce is not one this server issued")
        ident, expires = _LAYOUT.unpack(body)
        if expires < now:
            raise NonceInvalid("the nonce has expired")
        return Nonce(ident.hex(), float(expires))


def load_or_create_key(path: Path) -> bytes:
    """The data directory's nonce key, made once (every instance sharing the directory must use the same one: the
    key is linked into place, so of two instances starting together one makes it and both read the same)."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another instance won: use its key
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        _, data = read_small_file(path, 1024)
    except NotSmallRegularFile as e:
        raise OSError(f"{path}: {e}") from e
    return data
