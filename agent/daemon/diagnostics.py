"""`mobility diagnostics`: one tarball of logs, configuration, a state summary, health and versions, with
every secret redacted (the passphrase and tokens, private keys, proofs and nonces)."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import BootstrapConfigInvalid, DiagnosticsWriteFailed
from agent.host.paths import Paths
from agent.shared.fsutil import read_small_file
from agent.shared.secretfile import MAX_SECRET_BYTES

REDACTED = "[REDACTED]"
MAX_LOG_BYTES = 4 * 1024 * 1024  # per file: the newest part of a large log

_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_TOKEN = re.compile(r"mbt_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{20,}")
_SECRET_FIELD = re.compile(
    r"""(?ix)("?(?:passphrase|password|secret|token|proof|nonce)"?\s*[:=]\s*)("[^"]*"|'[^']*'|[^\s,}]+)"""
)
_NEVER_COLLECTED = ("client.key", "pending-enrolment.json", "passphrase")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with private keys, tokens, secret-looking fields and every known secret value replaced."""
    text = _PEM_PRIVATE.sub(REDACTED, text)
    text = _TOKEN.sub(REDACTED, text)
    text = _SECRET_FIELD.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def known_secrets(paths: Paths) -> list[str]:
    """Secret values this machine holds: the passphrase or token file named in bootstrap.conf (read by the
    bootstrap's own parser; a conf it refuses names no file, and is collected redacted like any other)."""
    from agent.lifecycle.bootstrap_conf import parse_bootstrap_conf, passphrase_path, read_bootstrap_conf

    try:
        conf = parse_bootstrap_conf(read_bootstrap_conf(paths), str(paths.bootstrap_conf))
    except BootstrapConfigInvalid:
        return []
    if not conf.get("passphrase_file"):
        return []
    try:  # a missing or unreadable file holds no secret to hide
        return [read_small_file(passphrase_path(paths, conf["passphrase_file"]), MAX_SECRET_BYTES)[1].decode().strip()]
    except (OSError, ValueError):
        return []


def _files(directory: Path) -> list[Path]:
    """Regular files below ``directory``; links are skipped (under --root one could lead to the host's files)."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if not p.is_symlink()
        and p.is_file()
        and p.name not in _NEVER_COLLECTED
        and not p.name.endswith((".key", ".pem"))
    )


def _read_tail(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        size = f.seek(0, 2)
        f.seek(max(0, size - MAX_LOG_BYTES))
        return f.read(MAX_LOG_BYTES).decode("utf-8", errors="replace")


def collect(paths: Paths, health: dict[str, Any], out: Path) -> list[str]:
    """Write the tarball to ``out``; return the names it holds."""
    secrets = known_secrets(paths)
    members: dict[str, str] = {}
    for f in _files(paths.log_dir):
        members[f"logs/{f.relative_to(paths.log_dir)}"] = redact(_read_tail(f), secrets)
    for f in _files(paths.config_dir):
        members[f"config/{f.relative_to(paths.config_dir)}"] = redact(_read_tail(f), secrets)
    state = (
        {
            str(p.relative_to(paths.state_dir)): p.stat().st_size
            for p in sorted(paths.state_dir.rglob("*"))
            if p.is_file()
        }
        if paths.state_dir.is_dir()
        else {}
    )
    members["state/files.json"] = json.dumps(state, indent=2)
    for name in ("identity.json", "daemon.json", "last-job.json", "freeze.json", "target.json", "update.json"):
        p = paths.state_dir / name
        if p.is_file() and not p.is_symlink():
            members[f"state/{name}"] = redact(_read_tail(p), secrets)
    members["health.json"] = redact(json.dumps(health, indent=2), secrets)
    members["versions.json"] = json.dumps(
        {
            "mobility": __version__,
            "python": platform.python_version(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "collected": time.time(),
        },
        indent=2,
    )
    try:
        _write_tarball(out, members)
    except OSError as e:
        raise DiagnosticsWriteFailed(f"cannot write {out}: {e.strerror or e}") from e
    return sorted(members)


def _write_tarball(out: Path, members: dict[str, str]) -> None:
    """A new file, private from its first byte, renamed over ``out``: a link planted at ``out`` is replaced,
    never written through (the command runs as root, often in a shared directory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name, text in members.items():
                data = text.encode()
                info = tarfile.TarInfo(f"mobility-diagnostics/{name}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
