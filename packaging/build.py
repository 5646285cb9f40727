"""Freeze the agent once with PyInstaller and lay it into one bundle per OS tag; optionally publish them.

Outputs in --out (default dist/):
    mobility-bootstrap                                   one-file bootstrapper for templates
    Mobility_UA_<ver>_<TAG>-64_GA_<DDMonYYYY>_release.tar.gz   one per OS tag
    build-info.json                                      sizes, glibc floor, source hash, timings
The PyInstaller outputs are cached under build/ by a hash of the sources: a second build with the same
sources only re-packs (and nothing at all if the bundles are already there)."""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: this folder is not a package (it would shadow PyPI's)

from agent import __version__  # noqa: E402
from agent.bundles import MANIFEST_NAME, bundle_file_name  # noqa: E402
from agent.distros.matrix import BY_TAG, SUPPORT_MATRIX, Init  # noqa: E402
from agent.fsutil import sha256_file  # noqa: E402

BUILD = REPO / "build" / "packaging"
SOURCES = ("agent", "packaging", "systemd", "pyproject.toml")

# Modules the frozen programs never need: the server side, and what only the daemon (next issues) uses.
SERVER_ONLY = ("server", "aiohttp", "multidict", "yarl", "frozenlist", "aiosignal", "propcache")
NOT_IN_BOOTSTRAP = (*SERVER_ONLY, "psutil", "schedule", "tkinter", "unittest", "pydoc", "xmlrpc")
BOOTSTRAP_NEEDS = ("agent.fetch", "agent.registration", "agent.transport", "agent.bundles", "agent.install")

_GLIBC = re.compile(rb"GLIBC_(\d+)\.(\d+)(?:\.\d+)?\0")
_FIXED_MTIME = 1_700_000_000  # reproducible archives: content decides the bytes, not the clock


def source_hash() -> str:
    h = hashlib.sha256()
    for top in SOURCES:
        base = REPO / top
        files = (
            [base]
            if base.is_file()
            else sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        )
        for f in files:
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def pyinstaller(*args: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--clean",
        "--log-level",
        "WARN",
        "--strip",
        "--paths",
        str(REPO),
        "--workpath",
        str(BUILD / "work"),
        "--specpath",
        str(BUILD / "spec"),
        *args,
    ]
    BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, cwd=BUILD)


def freeze(hash_: str) -> tuple[Path, Path]:
    """The one-file bootstrapper and the one-dir agent, rebuilt only when the sources changed."""
    out = BUILD / "frozen"
    stamp = out / "source-hash"
    bootstrap, agent = out / "mobility-bootstrap", out / "mobility"
    if stamp.exists() and stamp.read_text() == hash_ and bootstrap.is_file() and (agent / "mobility").is_file():
        print("frozen programs: cached (sources unchanged)")
        return bootstrap, agent
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    excludes = [a for m in NOT_IN_BOOTSTRAP for a in ("--exclude-module", m)]
    hidden = [a for m in BOOTSTRAP_NEEDS for a in ("--hidden-import", m)]
    pyinstaller(
        "--onefile",
        "--name",
        "mobility-bootstrap",
        "--distpath",
        str(out),
        *excludes,
        *hidden,
        str(REPO / "packaging" / "entry" / "mobility_bootstrap.py"),
    )
    excludes = [a for m in SERVER_ONLY for a in ("--exclude-module", m)]
    pyinstaller(
        "--onedir",
        "--name",
        "mobility",
        "--distpath",
        str(out),
        *excludes,
        str(REPO / "packaging" / "entry" / "mobility.py"),
    )
    stamp.write_text(hash_)
    print(f"frozen programs: built in {time.monotonic() - start:.0f} s")
    return bootstrap, agent


def glibc_floor(paths: list[Path]) -> str:
    """The newest GLIBC_x.y symbol version any of the ELF files needs: the oldest glibc they load on."""
    need = (2, 0)
    for root in paths:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            with f.open("rb") as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
            for major, minor in _GLIBC.findall(f.read_bytes()):
                need = max(need, (int(major), int(minor)))
    return f"{need[0]}.{need[1]}"


def bundle_members(tag: str, agent: Path) -> list[tuple[str, Path]]:
    """(name in the archive, file on disk) for one tag; the frozen agent is shared by every tag."""
    pkg = REPO / "packaging"
    members = [(f"mobility/{p.relative_to(agent)}", p) for p in sorted(agent.rglob("*"))]
    members += [
        (name, pkg / "bundle" / name) for name in ("install", "configure", "uninstall", "bootstrap", "entry.sh")
    ]
    if BY_TAG[tag].init is Init.SYSTEMD:
        members += [(f"units/{p.name}", p) for p in sorted((REPO / "systemd").iterdir())]
    else:
        members.append(("init.d/mobility", pkg / "sysv" / "mobility"))
    members += [(f"freeze.d/{p.name}", p) for p in sorted((pkg / "freeze.d").iterdir())]
    return members


def _info(name: str, path: Path | None, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = _FIXED_MTIME, 0, 0, "root", "root"
    if path is None:
        info.size, info.mode = size, 0o644
    elif path.is_symlink():
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(path.readlink()), 0o777
    elif path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = path.stat().st_size, 0o755 if path.stat().st_mode & 0o111 else 0o644
    return info


def write_bundle(tag: str, agent: Path, floor: str, out: Path, date: dt.date, hashes: dict[Path, str]) -> Path:
    members = bundle_members(tag, agent)
    files = {name: hashes[path] for name, path in members if path.is_file() and not path.is_symlink()}
    manifest = {
        "os_tag": tag,
        "version": __version__,
        "arch": "x86_64",
        "init": BY_TAG[tag].init.value,
        "glibc_floor": floor,
        "files": files,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    dest = out / bundle_file_name(__version__, tag, date)
    tmp = dest.with_suffix(".part")
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        tar.addfile(_info(MANIFEST_NAME, None, len(data)), io.BytesIO(data))
        for name, path in members:
            info = _info(name, path)
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    tmp.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="packaging/build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tags",
        nargs="+",
        metavar="TAG",
        help="OS tags to build (default: every tag of the default repository; RHEL5, SLES11-SP3 "
        "and DEBIAN7 only when named, as the seed has operators place those by hand)",
    )
    parser.add_argument("--publish", metavar="DATA_DIR", help="add the bundles to this server's repository")
    parser.add_argument("--out", default=str(REPO / "dist"), metavar="DIR")
    args = parser.parse_args(argv)
    tags = args.tags or [row.tag for row in SUPPORT_MATRIX if row.default_repo]
    unknown = [t for t in tags if t not in BY_TAG]
    if unknown:
        parser.error(f"unknown OS tags: {', '.join(unknown)} (known: {', '.join(BY_TAG)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    bootstrap, agent = freeze(source_hash())
    shutil.copy2(bootstrap, out / "mobility-bootstrap")
    floor = glibc_floor([bootstrap, agent])
    hashes = {p: sha256_file(p) for p in agent.rglob("*") if p.is_file() and not p.is_symlink()}
    for p in (REPO / "packaging").rglob("*"):
        if p.is_file():
            hashes[p] = sha256_file(p)
    for p in (REPO / "systemd").iterdir():
        hashes[p] = sha256_file(p)
    date = dt.datetime.now(dt.UTC).date()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # gzip releases the GIL
        bundles = list(pool.map(lambda t: write_bundle(t, agent, floor, out, date, hashes), tags))
    elapsed = time.monotonic() - start
    agent_size = sum(p.stat().st_size for p in agent.rglob("*") if p.is_file())
    info = {
        "version": __version__,
        "glibc_floor": floor,
        "seconds": round(elapsed, 1),
        "bootstrap_bytes": (out / "mobility-bootstrap").stat().st_size,
        "agent_bytes": agent_size,
        "bundles": {b.name: b.stat().st_size for b in bundles},
    }
    (out / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    mib = 1024 * 1024
    print(
        f"mobility-bootstrap: {info['bootstrap_bytes'] / mib:.1f} MiB; frozen agent: {agent_size / mib:.1f} MiB "
        f"unpacked; glibc floor {floor}"
    )
    for b in bundles:
        print(f"{b.name}: {b.stat().st_size / mib:.1f} MiB")
    print(f"{len(bundles)} bundles in {out} in {elapsed:.0f} s")
    if args.publish:
        r = subprocess.run(
            [sys.executable, "-m", "server", "repo", "add", "--data", args.publish, *map(str, bundles)],
            cwd=REPO,
            check=False,
        )
        if r.returncode:
            return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
