"""The bootstrap unpacks a fetched bundle with tarfile's "data" filter (issue 11): before, it used "tar", which
as root gives every file the owner the archive names, so a bundle could leave files owned by any user in the
staging copy (and from there in the install)."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.bundle_dir import unpack
from tests.bundle_factory import make_bundle
from tests.conftest import REPO
from tests.security.sandbox import FILES, make_root, sha256


def owned_by_someone_else(tar: tarfile.TarFile) -> None:
    for name, mode in (("./owned", 0o755), ("./lib/setid", 0o6755)):
        info = tarfile.TarInfo(name)
        data = b"#!/bin/sh\n"
        info.size, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), mode, 4242, 4242, "evil", "evil"
        tar.addfile(info, io.BytesIO(data))


def test_unpacked_files_belong_to_the_agent_not_to_the_archive(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("extraction sets owners only as root")
    root = make_root(tmp_path / "root")
    extra = {"owned": b"#!/bin/sh\n", "lib/setid": b"#!/bin/sh\n"}
    tarball = make_bundle(
        tmp_path / "dl",
        os_tag="DEBIAN12",
        files=FILES,
        edit_manifest=lambda doc: doc["files"].update({rel: sha256(data) for rel, data in extra.items()}),
        extra=owned_by_someone_else,
    )
    staging = unpack(Paths(root), tarball)
    for rel in ("owned", "lib/setid", "units/mobility.service"):
        st = (staging / rel).stat()
        assert (st.st_uid, st.st_gid) == (0, 0), rel
        assert st.st_mode & 0o7022 == 0, rel  # no set-id bits, no group/other write


def test_the_project_requires_a_python_with_extraction_filters() -> None:
    assert sys.version_info >= (3, 11, 4)
    text = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11.4"' in text
    assert "(3, 11, 4)" in (REPO / "scripts" / "setup").read_text()
    assert hasattr(tarfile, "data_filter")
