"""`mobility diagnostics`: one tarball of logs, configuration, a state summary, health and versions, with
every secret redacted (the passphrase and tokens, private keys, proofs and nonces)."""

from __future__ import annotations

import contextlib
import io
import json
import platform
import re
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.paths import Paths

REDACTED = "[REDACTED]"
MAX_LOG_BYTES = 4 * 1024 * 1024  # per file: the newest part of a large log

_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_TOKEN = re.compile(r"mbt_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{20,}")
_SECRET_FIELD = re.compile(
    r"""(?ix)("?(?:passphrase|password|secret|token|proof|nonce)"?\s*[:=]\s*)("[^"]*"|'[^']*'|[^\s,}]+)"""
)
_NEVER_COLLECTED = ("client.key", "passphrase")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with private keys, tokens, secret-looking fields and every known secret value replaced."""
    text = _PEM_PRIVATE.sub(REDACTED, text)
    text = _TOKEN.sub(REDACTED, text)
    text = _SECRET_FIELD.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def known_secrets(paths: Paths) -> list[str]:
    """Secret values this machine holds: the passphrase or token file named in bootstrap.conf."""
    found: list[str] = []
    try:
        conf = paths.bootstrap_conf.read_text()
    except OSError:
        return found
    for line in conf.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("passphrase_file", "token_file", "passphrase-file"):
            with_root = paths(value.strip()) if value.strip().startswith("/") else Path(value.strip())
            with contextlib.suppress(OSError):  # a missing file holds no secret to hide
                found.append(with_root.read_text().strip())
    return found


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name not in _NEVER_COLLECTED and not p.name.endswith((".key", ".pem"))
    )


def _read_tail(path: Path) -> str:
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - MAX_LOG_BYTES))
        return f.read().decode("utf-8", errors="replace")


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
    for name in ("identity.json", "daemon.json", "last-job.json"):
        p = paths.state_dir / name
        if p.is_file():
            members[f"state/{name}"] = redact(p.read_text(), secrets)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"mobility-diagnostics/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    out.chmod(0o600)
    return sorted(members)
