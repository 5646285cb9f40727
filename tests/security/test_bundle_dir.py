"""`install --bundle DIR` installs exactly what bundle.json lists and verifies the copy it installs (issue 11,
item 7; issue 14). Before: a file not listed was installed, a listed file that is a link out of the bundle was
followed (its target hashed, the link installed), and the directory was hashed first and copied after, so a file
swapped in between was installed unverified. Push install (`./bootstrap` -> `bootstrap --bundle`) takes the
same path (tests/security/test_root_escapes.py runs it against a real server)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

import agent.lifecycle.install
from agent.host.paths import Paths
from agent.lifecycle.install import install as install_in_process
from agent.lifecycle.prereq import DEFAULT_INSTALL_DIR
from agent.shared.errors import BundleRefused
from tests.security.sandbox import FILES, error_id, install, make_root, relist, snapshot, unpacked_bundle

CURRENT = "usr/local/mobility/current"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with version 0.1.0 installed: every refusal below must leave it running that version."""
    r = make_root(tmp_path / "root")
    done = install(r, unpacked_bundle(tmp_path / "first"))
    assert done.returncode == 0, done.stderr
    return r


def installed_files(root: Path, version: str) -> set[str]:
    base = root / "usr/local/mobility/versions" / version
    return {str(p.relative_to(base)) for p in base.rglob("*") if not p.is_dir()}


def assert_unchanged(root: Path, before: dict[str, str]) -> None:
    assert os.readlink(root / CURRENT) == "versions/0.1.0"
    after = snapshot(root / "usr/local/mobility")
    assert after == before, "the install directory changed"


def test_a_file_not_listed_is_not_installed(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    extra = {"planted.sh": b"#!/bin/sh\nevil\n", "units/evil.service": b"[Service]\nExecStart=/x\n"}
    bundle = unpacked_bundle(tmp_path / "b", files={**FILES, **extra}, listed=FILES)
    (bundle / ".hidden").mkdir()
    (bundle / ".hidden/x").write_text("x")
    r = install(root, bundle)
    assert r.returncode == 0, r.stderr
    assert installed_files(root, "0.1.0") == {*FILES, "bundle.json", ".complete"}


def test_a_listed_file_that_links_out_of_the_bundle_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"#!/bin/sh\nnot from the bundle\n")
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    (bundle / "mobility/mobility").unlink()
    (bundle / "mobility/mobility").symlink_to(outside)
    relist(bundle, "mobility/mobility", outside.read_bytes())  # the hash of what the link leads to
    before = snapshot(root / "usr/local/mobility")
    r = install(root, bundle)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert "mobility/mobility is a symbolic link" in r.stderr
    assert_unchanged(root, before)


def test_a_listed_file_under_a_linked_directory_is_refused(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mobility").write_bytes(FILES["mobility/mobility"])
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    for p in (bundle / "mobility").iterdir():
        p.unlink()
    (bundle / "mobility").rmdir()
    (bundle / "mobility").symlink_to(elsewhere)  # same content, reached through a link
    before = snapshot(root / "usr/local/mobility")
    r = install(root, bundle)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert "mobility is a symbolic link, not a directory" in r.stderr
    assert_unchanged(root, before)


def test_bundle_json_that_is_a_link_is_refused(root: Path, tmp_path: Path) -> None:
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    real = tmp_path / "manifest.json"
    (bundle / "bundle.json").rename(real)
    (bundle / "bundle.json").symlink_to(real)
    before = snapshot(root / "usr/local/mobility")
    r = install(root, bundle)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert_unchanged(root, before)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "socket"])
def test_a_listed_name_that_is_not_a_regular_file_is_refused_without_reading_it(
    root: Path, tmp_path: Path, kind: str
) -> None:
    """Before: a FIFO hung the install for ever and /dev/zero-like devices were read without end."""
    import socket

    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    target = bundle / "mobility/mobility"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(target, 0o644 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero's numbers
    elif kind == "directory":
        target.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    before = snapshot(root / "usr/local/mobility")
    r = install(root, bundle)  # bounded: a hang fails the test by its timeout
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert "not a regular file" in r.stderr
    assert_unchanged(root, before)


def test_a_refused_first_install_leaves_no_install_directory(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    bundle = unpacked_bundle(tmp_path / "b")
    (bundle / "units/mobility.service").write_text("tampered\n")
    r = install(root, bundle, "-d", "/srv/mobility")
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert not (root / "srv/mobility").exists()


def test_a_missing_or_tampered_listed_file_is_refused(root: Path, tmp_path: Path) -> None:
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    (bundle / "units/mobility.service").write_text("[Service]\nExecStart=/bin/sh -c evil\n")
    before = snapshot(root / "usr/local/mobility")
    r = install(root, bundle)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert_unchanged(root, before)
    (bundle / "units/mobility.service").unlink()
    r = install(root, bundle)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert "missing" in r.stderr
    assert_unchanged(root, before)


def test_a_file_swapped_after_the_first_look_cannot_get_in(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Install reads bundle.json, detects the OS and checks prerequisites before it copies: a file swapped then
    is the one copied, so it is the one hashed, and it is refused. (Before: verified first, copied after.)"""
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    evil = b"#!/bin/sh\nswapped in after verification\n"
    real_detect = agent.lifecycle.install.detect_os

    def detect_then_swap(paths: Paths) -> Any:
        (bundle / "mobility/mobility").write_bytes(evil)
        return real_detect(paths)

    monkeypatch.setattr(agent.lifecycle.install, "detect_os", detect_then_swap)
    before = snapshot(root / "usr/local/mobility")
    with pytest.raises(BundleRefused):
        install_in_process(Paths(root), bundle, DEFAULT_INSTALL_DIR, "MS", "VmWare")
    assert_unchanged(root, before)
    assert not any(evil in p.read_bytes() for p in (root / "usr/local/mobility").rglob("*") if p.is_file())


def test_what_is_installed_is_what_bundle_json_lists_with_its_modes(root: Path, tmp_path: Path) -> None:
    bundle = unpacked_bundle(tmp_path / "b", version="0.2.0")
    (bundle / "mobility/mobility").chmod(0o4777)  # set-id and world-write bits never reach the install
    r = install(root, bundle)
    assert r.returncode == 0, r.stderr
    base = root / "usr/local/mobility/versions/0.2.0"
    manifest = json.loads((base / "bundle.json").read_text())
    assert (base / "bundle.json").read_bytes() == (bundle / "bundle.json").read_bytes()
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((base / rel).read_bytes()).hexdigest() == digest
        assert not (base / rel).is_symlink()
    assert (base / "mobility/mobility").stat().st_mode & 0o7777 == 0o755
    assert (base / "units/mobility.service").stat().st_mode & 0o7777 == 0o644
    # Changing the bundle directory afterwards changes nothing installed.
    (bundle / "mobility/mobility").write_bytes(b"later\n")
    assert (base / "mobility/mobility").read_bytes() == FILES["mobility/mobility"]
    assert os.readlink(root / CURRENT) == "versions/0.2.0"


@pytest.mark.parametrize("bad", ["missing", "file", "no-manifest", "huge-manifest", "fifo-manifest"])
def test_a_bundle_dir_that_is_not_one_is_refused(root: Path, tmp_path: Path, bad: str) -> None:
    where = tmp_path / "b"
    if bad == "file":
        where.write_text("x")
    elif bad != "missing":
        where.mkdir()
        if bad == "huge-manifest":
            with (where / "bundle.json").open("wb") as f:
                f.truncate(8 << 30)  # sparse: 8 GiB of NULs that must never be read whole
        elif bad == "fifo-manifest":
            os.mkfifo(where / "bundle.json")
    before = snapshot(root / "usr/local/mobility")
    r = install(root, where)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert "Traceback" not in r.stderr
    assert_unchanged(root, before)
