"""What replication keeps under /var/lib/mobility/replication/ (the one module that opens it):

- ``status.json``: the daemon's last replication status, for `mobility status` and `mobility health` (they work
  while the daemon is down);
- ``tracing.json``: the nonce of the marker a clean stop left in the tracing it kept (agent/replication/tracing.py);
- ``requests/``: `mobility point` leaves ``ID.req`` and signals the daemon; the daemon answers ``ID.json``;
- ``disks/<disk>/``: each protected disk's own state (``state.json``, agent/replication/sync.py) and chunk hashes
  (``hashes``, agent/replication/hashfile.py), in a directory this module names."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

MAX_DOC = 1 << 20  # a status or a point result is a few KiB


def disk_dir(paths: Paths, name: str) -> Path:
    """The state directory of the protected disk ``name`` (/dev/sdb -> disks/dev_sdb)."""
    return paths.replication_dir / "disks" / name.strip("/").replace("/", "_")


def save_status(paths: Paths, doc: dict[str, Any]) -> None:
    atomic_write(paths.replication_dir / "status.json", json.dumps(doc, indent=1).encode(), 0o600)


def forget_status(paths: Paths) -> None:
    """Protection ended while the daemon was down: its last status describes disks no longer protected."""
    with contextlib.suppress(OSError):
        (paths.replication_dir / "status.json").unlink(missing_ok=True)


def load_status(paths: Paths) -> dict[str, Any] | None:
    """What the daemon last wrote about replication; None when nothing (or nothing readable) is there."""
    return _load(paths.replication_dir / "status.json")


# The tracing a clean stop kept ------------------------------------------------------------------------------------


def save_tracing_stop(paths: Paths, nonce: str) -> None:
    """The nonce of the marker a clean stop left in the tracing instance it kept (``tracing.json``)."""
    atomic_write(paths.replication_dir / "tracing.json", json.dumps({"stopped": nonce}).encode(), 0o600)


def load_tracing_stop(paths: Paths) -> str | None:
    doc = _load(paths.replication_dir / "tracing.json")
    nonce = doc.get("stopped") if doc else None
    return nonce if isinstance(nonce, str) and len(nonce) == 32 and nonce.isalnum() else None


def forget_tracing_stop(paths: Paths) -> None:
    with contextlib.suppress(OSError):
        (paths.replication_dir / "tracing.json").unlink(missing_ok=True)


# `mobility point` <-> the daemon --------------------------------------------------------------------------------


def _requests(paths: Paths) -> Path:
    return paths.replication_dir / "requests"


def leave_request(paths: Paths, request: str) -> None:
    folder = _requests(paths)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(folder / f"{request}.req", b"{}\n", 0o600)


def pending_requests(paths: Paths) -> list[str]:
    """The requests left and not answered yet, oldest name first."""
    try:
        return sorted(p.stem for p in _requests(paths).glob("*.req"))
    except OSError:
        return []


def answer_request(paths: Paths, request: str, result: dict[str, Any]) -> None:
    """The daemon's answer; the request is gone once it is there."""
    with contextlib.suppress(OSError):
        atomic_write(_requests(paths) / f"{request}.json", json.dumps(result).encode(), 0o600)
        (_requests(paths) / f"{request}.req").unlink(missing_ok=True)


def take_answer(paths: Paths, request: str) -> dict[str, Any] | None:
    """The answer to ``request`` if there is one yet (it is removed with its request)."""
    answer = _load(_requests(paths) / f"{request}.json")
    if answer is not None:
        forget_request(paths, request)
    return answer


def forget_request(paths: Paths, request: str) -> None:
    for suffix in (".req", ".json"):
        with contextlib.suppress(OSError):
            (_requests(paths) / f"{request}{suffix}").unlink(missing_ok=True)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        _, raw = read_small_file(path, MAX_DOC)
        doc = json.loads(raw)
    except (OSError, NotSmallRegularFile, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
