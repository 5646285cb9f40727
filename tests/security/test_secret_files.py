"""Secret files (`-P` of configure and bootstrap, `mobility-server push --password-file`) are small regular files,
checked on the opened descriptor before they are read, and read with a bound (issue 11). Before: `-P /dev/zero`
read until MemoryError, `-P FIFO` hung for ever, and so did a huge file. Every case runs in a child with a time
and memory bound, so a regression fails instead of hanging or exhausting the machine."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.security.sandbox import error_id, make_root, mobility, python


def fifo(where: Path) -> Path:
    os.mkfifo(where, 0o600)
    return where


def huge(where: Path) -> Path:
    with where.open("wb") as f:
        f.truncate(16 << 30)  # sparse: 16 GiB that must never be read
    where.chmod(0o600)
    return where


def dev_zero(where: Path) -> Path:
    return Path("/dev/zero")


def just_over_the_limit(where: Path) -> Path:
    where.write_bytes(b"x" * 4097)
    where.chmod(0o600)
    return where


def directory(where: Path) -> Path:
    where.mkdir(mode=0o700)
    return where


def link_to_a_too_open_file(where: Path) -> Path:
    target = where.with_name("open-secret")
    target.write_text("s3cret-passphrase\n")
    target.chmod(0o644)
    where.symlink_to(target)
    return where


def binary(where: Path) -> Path:
    where.write_bytes(b"\xff\xfe\x00bad")
    where.chmod(0o600)
    return where


def empty(where: Path) -> Path:
    where.write_bytes(b"\n")
    where.chmod(0o600)
    return where


BAD: dict[str, Callable[[Path], Path]] = {
    "fifo": fifo,
    "huge": huge,
    "dev-zero": dev_zero,
    "over-4KiB": just_over_the_limit,
    "directory": directory,
    "link-to-too-open": link_to_a_too_open_file,
    "binary": binary,
    "empty": empty,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_configure_refuses_a_bad_passphrase_file_at_once(tmp_path: Path, kind: str) -> None:
    secret = BAD[kind](tmp_path / "secret")
    try:
        # 127.0.0.1:1: nothing listens; the file is refused before any connection is tried
        r = mobility("configure", "-i", "127.0.0.1:1", "-P", str(secret), "--root", str(make_root(tmp_path / "r")))
    except subprocess.TimeoutExpired:
        pytest.fail(f"configure -P {kind} hung")
    assert (r.returncode, error_id(r)) == (1, "PASSPHRASE-FILE"), r.stderr
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    assert "s3cret" not in r.stderr + r.stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_bootstrap_refuses_a_bad_passphrase_file_in_the_root(tmp_path: Path, kind: str) -> None:
    root = make_root(tmp_path / "root")
    (root / "etc/mobility").mkdir()
    if kind == "dev-zero":
        (root / "etc/mobility/passphrase").symlink_to("/dev/zero")  # resolved inside the root: root/dev/zero
        (root / "dev").mkdir()
        if os.geteuid() == 0:
            os.mknod(root / "dev/zero", 0o600 | 0o020000, os.makedev(1, 5))
    else:
        BAD[kind](root / "etc/mobility/passphrase")
    (root / "etc/mobility/bootstrap.conf").write_text(
        "server = 127.0.0.1:1\npassphrase_file = /etc/mobility/passphrase\nretry_for = 0\n"
    )
    try:
        r = mobility("bootstrap", "--root", str(root))
    except subprocess.TimeoutExpired:
        pytest.fail(f"bootstrap with a {kind} passphrase file hung")
    assert (r.returncode, error_id(r)) == (1, "PASSPHRASE-FILE"), r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "directory"])
def test_push_password_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """The server's push reads --password-file with the same function (server/push/run.py)."""
    secret = BAD[kind](tmp_path / "password")
    code = (
        "from server.push.run import load_credentials\n"
        "from agent.shared.errors import MobilityError\n"
        "try:\n"
        f"    load_credentials('root', None, {str(secret)!r})\n"
        "except MobilityError as e:\n"
        "    print(e.id)\n"
    )
    try:
        r = python(code)
    except subprocess.TimeoutExpired:
        pytest.fail(f"push --password-file {kind} hung")
    assert r.stdout.strip() == "PUSH-CREDENTIALS-INVALID", r.stderr


def test_a_good_passphrase_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "ok"
    secret.write_text("  correct horse battery staple \n")
    secret.chmod(0o600)
    code = "from pathlib import Path\nfrom agent.shared.secretfile import read_secret_file\n"
    r = python(code + f"print(read_secret_file(Path({str(secret)!r})))")
    assert r.stdout == "correct horse battery staple\n", r.stderr
