"""What install recorded, /etc/mobility/agent.json: the one typed load and save of that file (nobody else opens it).

The file is input when it is read back (an operator or a damaged disk may have changed it): every field is checked
for its type, and the recorded install directory stays what it was (``install_dir``) until a reader parses it with
agent/lifecycle/install_dir.py, so that a poisoned value is refused where it is used and never replaced by a default."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.host.paths import Paths
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file

MAX_RECORD_BYTES = 64 * 1024  # a few fields


@dataclass(frozen=True)
class InstallRecord:
    version: str | None
    os_tag: str | None
    install_dir: object  # as recorded: parse_install_dir (or install_dir.release) before any use
    role: str | None = None
    platform: str | None = None
    previous: str | None = None  # the version install switched away from (kept for rollback)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "os_tag": self.os_tag,
            "install_dir": self.install_dir,
            "role": self.role,
            "platform": self.platform,
            "previous": self.previous,
        }


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def load_install_record(paths: Paths) -> InstallRecord | None:
    """The record, or None when there is none or it is not a JSON object (the agent is then not installed)."""
    try:
        _, data = read_small_file(paths.agent_config, MAX_RECORD_BYTES)
        doc = json.loads(data)
    except (OSError, NotSmallRegularFile, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return InstallRecord(
        version=_text(doc, "version"),
        os_tag=_text(doc, "os_tag"),
        install_dir=doc.get("install_dir"),
        role=_text(doc, "role"),
        platform=_text(doc, "platform"),
        previous=_text(doc, "previous"),
    )


def save_install_record(paths: Paths, record: InstallRecord) -> None:
    atomic_write(paths.agent_config, json.dumps(record.to_json(), indent=2).encode())
