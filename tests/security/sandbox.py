"""What the security tests build on: sandbox roots, unpacked bundles, a "host" beside the root, and the agent's
command line run with a time and memory bound (so that a regression that hangs or eats memory fails, never
hangs the suite)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.bundle_factory import manifest_for
from tests.conftest import DISTROS, REPO

UNIT_TEXT = b"[Service]\nExecStart=/usr/local/mobility/current/mobility/mobility run\n"
FILES: Mapping[str, bytes] = {
    "install": b'#!/bin/sh\nexec "$(dirname "$0")/mobility/mobility" install "$@"\n',
    "mobility/mobility": b"#!/bin/sh\necho mobility\n",
    "units/mobility.service": UNIT_TEXT,
    "units/mobility-bootstrap.service": b"[Service]\nExecStart=/usr/local/mobility/current/mobility/mobility boot\n",
    "units/mobility-bootstrap.timer": b"[Timer]\nOnBootSec=5min\n",
    "units/mobility-upgrade@.service": b"[Service]\nExecStart=/usr/local/mobility/versions/%i/mobility/mobility up\n",
}
EXECUTABLE = frozenset({"install", "mobility/mobility"})


def make_root(where: Path, machine_id: str = "5e" * 16) -> Path:
    """A source machine's root: real Debian 12 release files, its own machine-id and hostname."""
    shutil.copytree(DISTROS / "debian12", where, symlinks=True)
    (where / "etc" / "machine-id").write_text(machine_id + "\n")
    (where / "etc" / "hostname").write_text(f"sec-{machine_id[:6]}\n")
    return where


def unpacked_bundle(
    where: Path,
    version: str = "0.1.0",
    files: Mapping[str, bytes] = FILES,
    *,
    listed: Mapping[str, bytes] | None = None,
    os_tag: str = "DEBIAN12",
) -> Path:
    """An unpacked bundle directory: ``files`` written, bundle.json listing ``listed`` (default: ``files``)."""
    where.mkdir(parents=True)
    for rel, data in files.items():
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if rel in EXECUTABLE else 0o644)
    manifest = manifest_for(os_tag, version, files if listed is None else listed)
    (where / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return where


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relist(bundle: Path, rel: str, data: bytes) -> None:
    """Make bundle.json say that ``rel`` holds ``data``."""
    doc = json.loads((bundle / "bundle.json").read_text())
    doc["files"][rel] = sha256(data)
    (bundle / "bundle.json").write_text(json.dumps(doc, indent=2))


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry below ``directory``: kind and content (or link target), to show that nothing changed."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(directory))
            if p.is_symlink():
                found[rel] = "link " + os.readlink(p)
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = "file " + sha256(p.read_bytes())
    return found


def _bounded() -> None:
    two_gib = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (two_gib, two_gib))


def mobility(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``mobility ARGS`` (this checkout), at most ``timeout`` seconds and 2 GiB of address space."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
        preexec_fn=_bounded,
    )


def python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the same bounds (for library calls that could hang)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
        preexec_fn=_bounded,
    )


def error_id(r: subprocess.CompletedProcess[str]) -> str | None:
    """The ID of ``error ID: message`` on stderr (None if the command printed no such line)."""
    first = r.stderr.splitlines()[0] if r.stderr else ""
    return first.split(":", 1)[0].removeprefix("error ") if first.startswith("error ") else None


def install(root: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return mobility("install", "--bundle", str(bundle), "--root", str(root), "-r", "MS", "-v", "VmWare", "-q", *extra)


def uninstall(root: Path) -> subprocess.CompletedProcess[str]:
    return mobility("uninstall", "-Y", "--root", str(root), "--json")
