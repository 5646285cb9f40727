"""Hostile bundle archives against `repo add`, `repo rescan` and the agent's inspection, as separate processes.

Each archive is built for real with tarfile and gzip. The tar header bombs are ~255 KiB of gzip that
tarfile, left alone, expands into a 256 MiB name or pax header held in memory (0.6-1.3 GiB peak, and an
error line of 256 MiB). Every command must refuse each archive with BUNDLE-REFUSED, publish nothing,
print a short error and stay under a fixed memory cap, measured as the child's own peak RSS (wait4).
"""

from __future__ import annotations

import datetime
import gzip
import io
import itertools
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.lifecycle.bundles import bundle_file_name
from tests.bundle_factory import add_member, make_bundle
from tests.conftest import REPO

MEMORY_CAP = 100 << 20  # a refused bundle costs ~40 MiB (the interpreter and the server's imports)
TIME_CAP = 20.0  # seconds, each command; tarfile alone spends ~13 s on one pax header of 65,000 digits
STDERR_CAP = 2048
BOMB = 256 << 20  # what a header claims, or holds
NAME = bundle_file_name("0.1.0", "UBUNTU-20.04", datetime.date(2026, 11, 26))
CONTROL_NAME = "\x1b]0;owned\x07\x1b[2J\x9b31mlib/evil\nerror FORGED: all is well"


# Archives --------------------------------------------------------------------------------------------------


def _header(name: str, kind: bytes, size: int, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, 1_700_000_000
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def _repeated(byte: bytes, count: int) -> Iterator[bytes]:
    chunk = byte * (1 << 20)
    while count >= len(chunk):
        yield chunk
        count -= len(chunk)
    yield chunk[:count]


def _padding(size: int) -> bytes:
    return b"\0" * (-size % 512)


def _record_length(rest: int) -> int:
    """The length field of a pax record whose other bytes number ``rest`` (the field counts its own digits)."""
    digits = len(str(rest))
    while len(str(rest + digits)) != digits:
        digits += 1
    return rest + digits


def _trailer() -> Iterator[bytes]:
    # a member the extended headers would belong to, then the end of the archive
    yield _header("install", tarfile.REGTYPE, 0)
    yield b"\0" * 1024


def _streamed(path: Path, *parts: Iterable[bytes]) -> None:
    with gzip.open(path, "wb", compresslevel=9) as gz:
        for part in itertools.chain(*parts):
            gz.write(part)


def gnu_long(kind: bytes) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        size = BOMB + 1  # the name and its NUL, as tar writes it
        head = [_header("././@LongLink", kind, size), b"/"]  # absolute: once made the whole name the error line
        _streamed(path, head, _repeated(b"A", BOMB - 1), [b"\0", _padding(size)], _trailer())

    return build


def pax_bomb(kind: bytes, keyword: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        tail = f" {keyword}=".encode()
        size = _record_length(len(tail) + BOMB + 1)
        head = [_header("pax", kind, size, tarfile.USTAR_FORMAT), str(size).encode() + tail]
        _streamed(path, head, _repeated(b"A", BOMB), [b"\n", _padding(size)], _trailer())

    return build


def pax_digits(path: Path) -> None:
    # Not a size bomb: 65,000 digits make the pax parser of CPython < 3.11.10 quadratic (CVE-2024-6232).
    record = b" comment=" + b"7" * 65_000 + b"\n"
    data = str(_record_length(len(record))).encode() + record
    _streamed(path, [_header("pax", b"x", len(data), tarfile.USTAR_FORMAT), data, _padding(len(data))], _trailer())


def with_tarfile(fmt: int, members: Callable[[tarfile.TarFile], None]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w", format=fmt) as tar:
            members(tar)

    return build


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"x", pax: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax is not None:
        info.pax_headers = pax
    tar.addfile(info, io.BytesIO(data))


def unlisted_member(path: Path, name: str) -> None:
    assert make_bundle(path.parent, extra=add_member(name)) == path


def many_members(tar: tarfile.TarFile) -> None:
    for i in range(30_000):
        _file(tar, f"f{i}", b"")


@dataclass(frozen=True)
class Bomb:
    build: Callable[[Path], None]
    says: str


BOMBS = {
    "gnu-long-name": Bomb(gnu_long(tarfile.GNUTYPE_LONGNAME), f"GNU long name of {BOMB + 1} bytes, more than 65536"),
    "gnu-long-link": Bomb(gnu_long(tarfile.GNUTYPE_LONGLINK), f"GNU long link of {BOMB + 1} bytes, more than 65536"),
    "pax-path": Bomb(pax_bomb(tarfile.XHDTYPE, "path"), "pax header of 2684354"),
    "pax-linkpath": Bomb(pax_bomb(tarfile.XHDTYPE, "linkpath"), "pax header of 2684354"),
    "pax-global": Bomb(pax_bomb(tarfile.XGLTYPE, "comment"), "pax global header of 2684354"),
    "pax-digits": Bomb(pax_digits, "pax header with a run of more than 64 digits"),
    "pax-size-override": Bomb(
        with_tarfile(tarfile.PAX_FORMAT, lambda tar: _file(tar, "install", b"", {"size": str(1 << 40)})),
        "pax header overrides a member's size",
    ),
    "name-100kb": Bomb(
        with_tarfile(tarfile.GNU_FORMAT, lambda tar: _file(tar, "a/" * 50_000 + "x")),
        "GNU long name of 100002 bytes, more than 65536",
    ),
    "name-10kb-pax": Bomb(
        with_tarfile(tarfile.PAX_FORMAT, lambda tar: _file(tar, "b/" * 5_000 + "x")),
        "pax path of 10001 bytes, more than 1024",
    ),
    "30000-members": Bomb(with_tarfile(tarfile.GNU_FORMAT, many_members), "more than 20000 members"),
    # a good bundle plus one unlisted member whose name would drive the terminal and forge a line
    "control-characters": Bomb(
        lambda path: unlisted_member(path, CONTROL_NAME),
        r"'\x1b]0;owned\x07\x1b[2J\x9b31mlib/evil\nerror FORGED: all is well' is in the archive but not listed",
    ),
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("bombs")
    built = {}
    for key, bomb in BOMBS.items():
        (where / key).mkdir()
        path = where / key / NAME
        bomb.build(path)
        built[key] = path
    return built


def test_the_header_bombs_are_small(bombs: dict[str, Path]) -> None:
    for key in ("gnu-long-name", "gnu-long-link", "pax-path", "pax-linkpath", "pax-global"):
        assert bombs[key].stat().st_size < 300 << 10, key


# Running a command and measuring it ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: bytes
    peak_rss: int  # bytes
    seconds: float


# Runs the command, then writes the command's peak RSS (KiB) to a file. Why a separate launcher: Linux carries a
# process's peak RSS across exec, so a child forked from this (large) test process would report the test's own
# peak; a child forked from this small launcher reports at most the launcher's ~10 MiB plus its own.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[3:], timeout=float(sys.argv[2])).returncode
with open(sys.argv[1], "w") as f:
    f.write(f"{code} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def measured(args: list[str], tmp_path: Path) -> Ran:
    """Run ``args`` (cwd: the repository); its exit code, output, peak RSS and time."""
    report = tmp_path / "peak"
    report.unlink(missing_ok=True)
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(report), str(TIME_CAP), *args],
        capture_output=True,
        cwd=REPO,
        timeout=TIME_CAP + 30,
        check=False,
    )
    seconds = time.monotonic() - start
    assert report.exists(), f"{args[1:4]} ran for more than {TIME_CAP} s: {r.stderr[-500:]!r}"
    code, peak_kib = (int(v) for v in report.read_text().split())
    return Ran(code, r.stdout.decode(errors="replace"), r.stderr, peak_kib * 1024, seconds)


def server_cmd(data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "server", *args, "--data", str(data)]


INSPECT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from agent.lifecycle.bundles import inspect_bundle\n"
    "from agent.shared.errors import MobilityError\n"
    "try:\n"
    "    inspect_bundle(Path(sys.argv[1]))\n"
    "except MobilityError as e:\n"
    "    print(e.diagnostics(), file=sys.stderr)\n"
    "    sys.exit(e.exit_code)\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("cs") / "data"
    r = subprocess.run(
        server_cmd(where, "init", "--name", "127.0.0.1"), cwd=REPO, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    return where


def published(data: Path, tmp_path: Path) -> str:
    r = measured(server_cmd(data, "repo", "list", "--json"), tmp_path)
    assert r.code == 0, r.stderr
    return r.stdout.strip()


def assert_bounded(ran: Ran, says: str, what: str) -> None:
    assert ran.peak_rss < MEMORY_CAP, f"{what}: peak RSS {ran.peak_rss >> 20} MiB"
    assert len(ran.stderr) < STDERR_CAP, f"{what}: {len(ran.stderr)} bytes on stderr"
    text = ran.stderr.decode()
    assert "Traceback" not in text, text
    assert says in text, text
    # Nothing from the archive reaches the terminal raw: no escape, bell or C1 control, no forged line.
    assert not any(c in text for c in "\x1b\x07\x9b"), text
    assert "\nerror FORGED" not in text, text


# The tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(BOMBS))
def test_repo_add_refuses_within_bounds(key: str, bombs: dict[str, Path], data: Path, tmp_path: Path) -> None:
    ran = measured(server_cmd(data, "repo", "add", str(bombs[key])), tmp_path)
    assert ran.code == 1, ran.stderr
    assert ran.stderr.startswith(f"error BUNDLE-REFUSED: {NAME}: ".encode()), ran.stderr[:300]
    assert len(ran.stderr.decode().splitlines()) == 2  # the error and its fix
    assert_bounded(ran, BOMBS[key].says, f"repo add {key}")
    assert published(data, tmp_path) == "[]"
    assert sorted(p.name for p in (data / "repository").iterdir()) == []  # not even the temporary copy


@pytest.mark.parametrize("key", list(BOMBS))
def test_repo_rescan_refuses_within_bounds(key: str, bombs: dict[str, Path], data: Path, tmp_path: Path) -> None:
    dropped = data / "repository" / NAME
    dropped.write_bytes(bombs[key].read_bytes())
    try:
        ran = measured(server_cmd(data, "repo", "rescan"), tmp_path)
    finally:
        dropped.unlink()
    assert ran.code == 1, ran.stderr
    assert ran.stderr.startswith(f"refused '{NAME}': {NAME}: ".encode()), ran.stderr[:300]
    assert_bounded(ran, BOMBS[key].says, f"repo rescan {key}")
    assert published(data, tmp_path) == "[]"


@pytest.mark.parametrize("key", list(BOMBS))
def test_agent_inspection_refuses_within_bounds(key: str, bombs: dict[str, Path], tmp_path: Path) -> None:
    ran = measured([sys.executable, "-c", INSPECT, str(bombs[key])], tmp_path)
    assert ran.code == 1, ran.stderr
    assert ran.stderr.startswith(b"error BUNDLE-REFUSED: "), ran.stderr[:300]
    assert_bounded(ran, BOMBS[key].says, f"inspect {key}")


def test_repo_rescan_does_not_print_dropped_file_names_raw(data: Path, tmp_path: Path) -> None:
    # Whoever can write DATA/repository chooses the file names rescan reports.
    dropped = data / "repository" / "\x1b]0;owned\x07\x1b[2J\nerror FORGED: all is well"
    dropped.write_bytes(b"not a bundle")
    try:
        ran = measured(server_cmd(data, "repo", "rescan"), tmp_path)
    finally:
        dropped.unlink()
    assert ran.code == 1
    assert_bounded(ran, "is not a bundle name", "repo rescan")
    assert len(ran.stderr.decode().splitlines()) == 1
