"""Builds real installer bundle tarballs for tests (the wire format of agent/lifecycle/bundles.py)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.host.distros.matrix import BY_TAG
from agent.lifecycle.bundles import bundle_file_name

DEFAULT_FILES: Mapping[str, bytes] = {
    "install": b'#!/bin/sh\nexec ./mobility install "$@"\n',
    "lib/mobility/agent.py": b"print('mobility agent')\n",
    "units/mobility.service": b"[Service]\nType=notify\nExecStart=/usr/local/mobility/current/mobility run\n",
}


def manifest_for(os_tag: str, version: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "os_tag": os_tag,
        "version": version,
        "arch": "x86_64",
        "init": str(BY_TAG[os_tag].init),
        "kernel_floor": "3.2",
        "runtime_glibc": "2.36",
        "files": {path: hashlib.sha256(data).hexdigest() for path, data in files.items()},
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def make_bundle(
    dest_dir: Path,
    os_tag: str = "UBUNTU-20.04",
    version: str = "0.1.0",
    date: datetime.date = datetime.date(2026, 11, 26),
    files: Mapping[str, bytes] = DEFAULT_FILES,
    *,
    name: str | None = None,
    manifest: dict[str, Any] | bytes | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
    extra: Callable[[tarfile.TarFile], None] | None = None,
    prefix: str = "./",
    tar_format: int = tarfile.PAX_FORMAT,
) -> Path:
    """Write a bundle to ``dest_dir`` and return its path; the keyword arguments make it wrong on purpose.

    ``files`` are what the archive holds; ``manifest`` replaces bundle.json (bytes are written verbatim),
    ``edit_manifest`` changes the generated one, ``extra`` adds members after the rest.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / (name or bundle_file_name(version, os_tag, date))
    doc = manifest if manifest is not None else manifest_for(os_tag, version, files)
    if edit_manifest is not None and isinstance(doc, dict):
        edit_manifest(doc)
    manifest_bytes = doc if isinstance(doc, bytes) else json.dumps(doc, indent=2).encode()
    with tarfile.open(path, "w:gz", format=tar_format) as tar:
        _add(tar, prefix + "bundle.json", manifest_bytes)
        for member, data in files.items():
            _add(tar, prefix + member, data, 0o755 if member == "install" else 0o644)
        if extra is not None:
            extra(tar)
    return path


def add_member(name: str, data: bytes = b"x") -> Callable[[tarfile.TarFile], None]:
    return lambda tar: _add(tar, name, data)


def add_special(name: str, kind: bytes, linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def extra(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)

    return extra
