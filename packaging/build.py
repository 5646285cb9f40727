"""Freeze the agent once with PyInstaller, bundle its C runtime, and lay it into one bundle per OS tag; optionally
publish them.

Outputs in --out (default dist/):
    mobility-bootstrap                                   the bootstrapper for templates: a static launcher with the
                                                         one-dir frozen bootstrapper appended (packaging/launcher/)
    mobility-bootstrap.service, mobility-bootstrap.timer its units, baked into a template beside it
    Mobility_UA_<ver>_<TAG>-64_GA_<DDMonYYYY>_release.tar.gz   one per OS tag
    build-info.json                                      the bundled C runtime (glibc, loader, each library's
                                                         sha256 and package), kernel floor, sizes, timings
The frozen programs are cached under build/ by a hash of the sources: a second build with the same sources only
re-packs (and nothing at all if the bundles are already there). The version is data, not code: `--version 0.1.1`
packs the same frozen programs with a VERSION file that they report (agent/__init__.py), so every version of one
source tree costs one PyInstaller build. `--test-entry tests/...py` freezes the agent with a test-only entry point
instead (the update tests' deliberately broken agents): only the test suite passes it, its programs are cached apart
from the release ones, and its build makes bundles only. See packaging/README.md."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: this folder is not a package (it would shadow PyPI's)

from agent import __version__  # noqa: E402
from agent.host.distros.matrix import BY_TAG, RUNTIME_KERNEL_FLOOR, SUPPORT_MATRIX, Init  # noqa: E402
from agent.host.elf import ElfError, is_elf, parse_elf  # noqa: E402
from agent.host.libc import glibc_version_of  # noqa: E402
from agent.host.runtime import LOADER_NAME, kernel_floor_of, kernel_version  # noqa: E402
from agent.lifecycle.bundles import MANIFEST_NAME, STATE_FORMAT, bundle_file_name  # noqa: E402
from agent.shared.fsutil import sha256_file  # noqa: E402

BUILD = REPO / "build" / "packaging"
SOURCES = ("agent", "packaging", "systemd", "pyproject.toml")
TEMPLATE_UNITS = ("mobility-bootstrap.service", "mobility-bootstrap.timer")

# Modules the frozen programs never need: the server side, and what only the daemon (next issues) uses. The
# bootstrapper also leaves out what only PyInstaller's run-time hooks would import at every start (multiprocessing,
# pkgutil: ~15 ms of its at-boot no-op).
SERVER_ONLY = (
    *("server", "aiohttp", "multidict", "yarl", "frozenlist", "aiosignal", "propcache"),
    *("sqlalchemy", "alembic", "mako", "psycopg", "psycopg_binary", "psycopg_pool", "greenlet", "asyncssh", "uvloop"),
)
NOT_IN_BOOTSTRAP = (
    *SERVER_ONLY,
    *("psutil", "schedule", "tkinter", "unittest", "pydoc", "xmlrpc", "multiprocessing", "pkgutil"),
)
# Never in a frozen program: the test suite's fault injector and the sitecustomize that loads it (agent/faults.py).
# The suite runs this build with them on PYTHONPATH, where PyInstaller's analysis would otherwise find them.
TEST_ONLY = ("tests", "sitecustomize")
BOOTSTRAP_NEEDS = (
    "agent.lifecycle.fetch",
    "agent.lifecycle.registration",
    "agent.lifecycle.api_client",
    "agent.lifecycle.bundles",
    "agent.lifecycle.install",
)

AGENT_RUNTIME = "_internal"  # mobility/_internal/: the agent's PyInstaller program, libraries and C runtime
VERSION_FILE = "VERSION"  # beside the frozen modules: the version a build packs (agent/__init__.py reads it)
_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+)+")
PAYLOAD_MAGIC = b"MOBSFX01"  # packaging/launcher/bootstrap.c: the trailer of the bootstrapper
PAYLOAD_ID_SIZE = 64

_GLIBC = re.compile(rb"GLIBC_(\d+)\.(\d+)(?:\.\d+)?\0")
_FIXED_MTIME = 1_700_000_000  # reproducible archives: content decides the bytes, not the clock


class BuildError(RuntimeError):
    """The build cannot produce a bundle that runs where it claims to: say why and stop."""


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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MOBILITY_TEST_")}
    subprocess.run(cmd, check=True, cwd=BUILD, env=env)


# The C runtime -------------------------------------------------------------------------------------------------


@dataclass
class Library:
    source: str  # where it came from on the build host
    sha256: str
    package: str | None  # the Debian package and version that installed it, when dpkg knows


@dataclass
class Runtime:
    """What a build bundled of the build host's C runtime: recorded in build-info.json and bundle.json."""

    glibc: str
    kernel_floor: str
    loader: str  # the loader the PyInstaller bootloader names (PT_INTERP), bundled as ld-linux-x86-64.so.2
    libraries: dict[str, Library] = field(default_factory=dict)


def host_libraries() -> dict[str, Path]:
    """soname -> path of the build host's x86-64 libraries, as its loader finds them (ldconfig's cache)."""
    found: dict[str, Path] = {}
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and "x86-64" in m.group(2):
            found.setdefault(m.group(1), Path(m.group(3)))
    return found


def _package_of(path: Path) -> str | None:
    r = subprocess.run(["dpkg-query", "-S", str(path)], capture_output=True, text=True, check=False)
    if r.returncode:
        return None
    name = r.stdout.split(":", 1)[0].strip()
    v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=False)
    return f"{name} {v.stdout.strip()}" if v.returncode == 0 else name


def _elf_files(tree: Path) -> dict[Path, bytes]:
    out = {}
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with p.open("rb") as f:
                if is_elf(f.read(4)):
                    out[p] = p.read_bytes()
    return out


def _resolvable(tree: Path, elf_path: Path, soname: str, runpath: tuple[str, ...]) -> bool:
    """Whether the bundled loader, given --library-path TREE, finds ``soname`` for ``elf_path`` inside the tree."""
    dirs = [tree, *(Path(p.replace("$ORIGIN", str(elf_path.parent))) for p in runpath)]
    return any((d / soname).is_file() and tree in [d, *d.parents] for d in dirs)


def bundle_runtime(tree: Path, program: Path) -> Runtime:
    """Copy into ``tree`` (a PyInstaller one-dir tree with ``--contents-directory .``) the loader ``program`` names
    and every library the tree's ELF files need that PyInstaller left to the host (libc, libm, libpthread, ...): the
    DT_NEEDED closure, so that the tree never loads anything of the host's C runtime. Raises BuildError if something
    is still missing afterwards."""
    host = host_libraries()
    interp = parse_elf(program.read_bytes()).interp
    if interp is None or Path(interp).name != LOADER_NAME:
        raise BuildError(f"{program} names the loader {interp!r}, not an x86-64 glibc's {LOADER_NAME}")
    runtime = Runtime(glibc="", kernel_floor="", loader=interp)
    pending = [(LOADER_NAME, Path(interp))]
    seen: set[str] = set()
    while True:
        while pending:
            soname, source = pending.pop()
            if soname in seen:
                continue
            seen.add(soname)
            data = source.read_bytes()  # follows the symlink: the library itself, under its soname
            (tree / soname).write_bytes(data)
            (tree / soname).chmod(0o755)
            runtime.libraries[soname] = Library(
                str(source.resolve()), hashlib.sha256(data).hexdigest(), _package_of(source)
            )
        missing = []
        for path, data in _elf_files(tree).items():
            try:
                elf = parse_elf(data)
            except ElfError as e:
                raise BuildError(f"{path}: {e}") from e
            missing += [n for n in elf.needed if n not in seen and not _resolvable(tree, path, n, elf.runpath)]
        if not missing:
            break
        for soname in sorted(set(missing)):
            if soname not in host:
                raise BuildError(f"{soname}, needed by the frozen tree {tree}, is not installed on the build host")
            pending.append((soname, host[soname]))
    libc = (tree / "libc.so.6").read_bytes()
    runtime.glibc = glibc_version_of(libc) or ""
    runtime.kernel_floor = kernel_floor_of(libc) or ""
    floor, matrix_floor = kernel_version(runtime.kernel_floor), kernel_version(RUNTIME_KERNEL_FLOOR)
    if not runtime.glibc or floor is None or matrix_floor is None:
        raise BuildError(f"cannot read the glibc release and kernel floor of {runtime.libraries['libc.so.6'].source}")
    if floor > matrix_floor:
        raise BuildError(
            f"the build host's glibc {runtime.glibc} needs Linux {runtime.kernel_floor}, newer than the "
            f"{RUNTIME_KERNEL_FLOOR} the support matrix promises (agent/host/distros/matrix.py): build on an older host"
        )
    needs = glibc_floor([tree])
    if (kernel_version(needs) or (0, 0)) > (kernel_version(runtime.glibc) or (0, 0)):
        raise BuildError(f"{tree} needs glibc {needs}, newer than the bundled {runtime.glibc}")
    return runtime


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


# The launchers and the bootstrapper's payload ------------------------------------------------------------------


def compile_launcher(source: str, dest: Path, runtime: Runtime, *libs: str) -> None:
    """A static launcher (no libc of the host needed) that knows the kernel floor of the bundled C runtime."""
    if shutil.which("gcc") is None:
        raise BuildError("gcc is not installed (scripts/setup installs gcc, libc6-dev and zlib1g-dev)")
    major, minor = kernel_version(runtime.kernel_floor) or (0, 0)
    cmd = ["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror"]
    cmd += [f"-DKERNEL_FLOOR_MAJOR={major}", f"-DKERNEL_FLOOR_MINOR={minor}"]
    cmd += ["-o", str(dest), str(REPO / "packaging" / "launcher" / source), *libs]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise BuildError(f"compiling {source} failed: {r.stderr.strip()[-2000:]}")


def pack_payload(tree: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """The records of packaging/launcher/bootstrap.c for every directory and file of ``tree``, and the files
    ``extra`` (name at the top of the tree -> content), zlib-compressed.
    Deterministic: sorted paths (parents first), modes 0755/0644, no owners or times."""
    raw = io.BytesIO()
    for name, data in sorted((extra or {}).items()):
        if (tree / name).exists():
            raise BuildError(f"{tree / name} exists: the payload's {name} is written by the build")
        raw.write(struct.pack("<cIIQ", b"f", 0o644, len(name.encode()), len(data)) + name.encode() + data)
    for p in sorted(tree.rglob("*")):
        rel = str(p.relative_to(tree)).encode()
        if p.is_symlink():
            raise BuildError(f"{p} is a symbolic link: the bootstrapper's payload holds directories and files only")
        if p.is_dir():
            raw.write(struct.pack("<cIIQ", b"d", 0o755, len(rel), 0) + rel)
        else:
            data = p.read_bytes()
            mode = 0o755 if p.stat().st_mode & 0o111 else 0o644
            raw.write(struct.pack("<cIIQ", b"f", mode, len(rel), len(data)) + rel + data)
    raw.write(struct.pack("<cIIQ", b"E", 0, 0, 0))
    return zlib.compress(raw.getvalue(), 9)


def write_bootstrapper(launcher: Path, tree: Path, dest: Path, version: str) -> str:
    """launcher + payload (the tree and its VERSION) + trailer (magic, offset, size, cache id); returns the cache id:
    <version>-<hash>."""
    payload = pack_payload(tree, {VERSION_FILE: f"{version}\n".encode()})
    ident = f"{version}-{hashlib.sha256(payload).hexdigest()[:16]}"
    head = launcher.read_bytes()
    trailer = PAYLOAD_MAGIC + struct.pack("<QQ", len(head), len(payload)) + ident.encode().ljust(PAYLOAD_ID_SIZE, b"\0")
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(head + payload + trailer)
    tmp.chmod(0o755)
    tmp.replace(dest)
    return ident


@dataclass
class Frozen:
    bootstrap_launcher: Path | None  # the bootstrapper's static launcher (None in a test build: bundles only)
    bootstrap_tree: Path | None  # what the bootstrapper unpacks (for the tests and the sizes)
    agent: Path  # the bundle's mobility/: the launcher and _internal/
    runtime: Runtime
    out: Path  # the cache directory of these frozen programs


def freeze(hash_: str, test_entry: Path | None = None) -> Frozen:
    """The bootstrapper and the agent, frozen with their C runtime; rebuilt only when the sources changed. With
    ``test_entry``, the agent alone, started by that test-only entry point, cached apart from the release build (so
    that switching between them rebuilds neither)."""
    out = BUILD / "frozen" if test_entry is None else BUILD / f"frozen-test-{test_entry.stem}"
    if test_entry is not None:
        hash_ = hashlib.sha256(hash_.encode() + b"\0" + test_entry.read_bytes()).hexdigest()
    stamp, facts = out / "source-hash", out / "frozen.json"
    pyi = out / "pyi"
    bootstrap = (out / "launcher-bootstrap", pyi / "mobility-bootstrap") if test_entry is None else (None, None)
    if stamp.exists() and stamp.read_text() == hash_ and facts.is_file():
        doc = json.loads(facts.read_text())
        runtime = Runtime(**{**doc["runtime"], "libraries": {}})
        runtime.libraries = {k: Library(**v) for k, v in doc["runtime"]["libraries"].items()}
        print("frozen programs: cached (sources unchanged)")
        return Frozen(*bootstrap, out / "mobility", runtime, out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    common = ("--onedir", "--contents-directory", ".", "--distpath", str(pyi))
    if test_entry is None:
        excludes = [a for m in (*NOT_IN_BOOTSTRAP, *TEST_ONLY) for a in ("--exclude-module", m)]
        hidden = [a for m in BOOTSTRAP_NEEDS for a in ("--hidden-import", m)]
        pyinstaller(
            *common,
            "--name",
            "mobility-bootstrap",
            *excludes,
            *hidden,
            str(REPO / "packaging" / "entry" / "mobility_bootstrap.py"),
        )
    entry = test_entry or REPO / "packaging" / "entry" / "mobility.py"
    excludes = [a for m in (*SERVER_ONLY, *TEST_ONLY) for a in ("--exclude-module", m)]
    pyinstaller(*common, "--name", "mobility", *excludes, str(entry))
    agent_tree = pyi / "mobility"
    runtime = bundle_runtime(agent_tree, agent_tree / "mobility")
    agent = out / "mobility"
    (agent / AGENT_RUNTIME).parent.mkdir(parents=True)
    shutil.copytree(agent_tree, agent / AGENT_RUNTIME, symlinks=True)
    compile_launcher("agent.c", agent / "mobility", runtime)
    if test_entry is None:
        bundle_runtime(pyi / "mobility-bootstrap", pyi / "mobility-bootstrap" / "mobility-bootstrap")
        compile_launcher("bootstrap.c", out / "launcher-bootstrap", runtime, "-lz")
    facts.write_text(json.dumps({"runtime": asdict(runtime), "test_entry": str(test_entry)}, indent=2) + "\n")
    stamp.write_text(hash_)
    print(f"frozen programs: built in {time.monotonic() - start:.0f} s")
    return Frozen(*bootstrap, agent, runtime, out)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """An exclusive lock on the build cache, held while it is checked or filled: a second build waits for the first
    (and then finds the cache filled) instead of both writing into it."""
    BUILD.mkdir(parents=True, exist_ok=True)
    fd = os.open(BUILD / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def bootstrapper(frozen: Frozen, version: str) -> tuple[Path, str]:
    """The self-unpacking bootstrapper of ``version`` and its cache ID, made once per version of a frozen build."""
    if frozen.bootstrap_launcher is None or frozen.bootstrap_tree is None:
        raise BuildError("a test build makes bundles only: no bootstrapper")
    where = frozen.out / f"bootstrap-{version}"
    dest, ident_file = where / "mobility-bootstrap", where / "cache-id"
    if dest.is_file() and ident_file.is_file():
        return dest, ident_file.read_text().strip()
    where.mkdir(parents=True, exist_ok=True)
    ident = write_bootstrapper(frozen.bootstrap_launcher, frozen.bootstrap_tree, dest, version)
    ident_file.write_text(ident + "\n")
    return dest, ident


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


def write_bundle(
    tag: str, agent: Path, runtime: Runtime, out: Path, date: dt.date, hashes: dict[Path, str], version: str
) -> Path:
    members = bundle_members(tag, agent)
    files = {name: hashes[path] for name, path in members if path.is_file() and not path.is_symlink()}
    version_member = f"mobility/{AGENT_RUNTIME}/{VERSION_FILE}"
    if version_member in files:
        raise BuildError(f"{agent}/{AGENT_RUNTIME}/{VERSION_FILE} exists: the bundle's {VERSION_FILE} is written here")
    version_bytes = f"{version}\n".encode()
    files[version_member] = hashlib.sha256(version_bytes).hexdigest()
    manifest = {
        "os_tag": tag,
        "version": version,
        "arch": "x86_64",
        "init": BY_TAG[tag].init.value,
        "kernel_floor": runtime.kernel_floor,
        "runtime_glibc": runtime.glibc,
        "state_format": STATE_FORMAT,
        "files": files,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    dest = out / bundle_file_name(version, tag, date)
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
        tar.addfile(_info(version_member, None, len(version_bytes)), io.BytesIO(version_bytes))
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
        help="OS tags to build (default: every supported tag of the default repository; DEBIAN7 only when named, "
        "as the seed has operators place it by hand; tags refused for their kernel are never built)",
    )
    parser.add_argument("--publish", metavar="DATA_DIR", help="add the bundles to this server's repository")
    parser.add_argument("--out", default=str(REPO / "dist"), metavar="DIR")
    parser.add_argument(
        "--version",
        default=__version__,
        help=f"the version the programs and bundles carry (default: the sources', {__version__})",
    )
    parser.add_argument(
        "--bundles-only", action="store_true", help="make the bundles but not the bootstrapper (which takes longest)"
    )
    parser.add_argument(
        "--test-entry",
        metavar="FILE",
        help="tests only: freeze the agent with this entry point under tests/ instead of the product's (bundles only)",
    )
    args = parser.parse_args(argv)
    if not _VERSION.fullmatch(args.version) or len(args.version) > 32:
        parser.error(f"--version {args.version!r}: give dotted numbers, e.g. 0.1.1")
    test_entry = None
    if args.test_entry is not None:
        test_entry = Path(args.test_entry).resolve()
        if not test_entry.is_file() or (REPO / "tests") not in test_entry.parents:
            parser.error(f"--test-entry {args.test_entry}: must be a file under {REPO / 'tests'} (never a release)")
    tags = args.tags or [row.tag for row in SUPPORT_MATRIX if row.built_by_default]
    unknown = [t for t in tags if t not in BY_TAG]
    if unknown:
        parser.error(f"unknown OS tags: {', '.join(unknown)} (known: {', '.join(BY_TAG)})")
    refused = [BY_TAG[t] for t in tags if not BY_TAG[t].supported]
    if refused:
        parser.error(
            "no bundle for "
            + "; ".join(f"{row.tag}: {row.refusal}" for row in refused)
            + " (docs/support-matrix.md: detected and refused until a legacy build exists)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        with build_lock():  # one PyInstaller run at a time: builds share the cache and PyInstaller's work directory
            frozen = freeze(source_hash(), test_entry)
            boot = bootstrapper(frozen, args.version) if test_entry is None and not args.bundles_only else None
    except BuildError as e:
        print(f"packaging/build: {e}", file=sys.stderr)
        return 1
    agent, runtime = frozen.agent, frozen.runtime
    if boot is not None:
        shutil.copy2(boot[0], out / "mobility-bootstrap")
        for unit in TEMPLATE_UNITS:  # what an operator bakes into a template beside it (docs/templates.md)
            shutil.copy2(REPO / "systemd" / unit, out / unit)
    hashes = {p: sha256_file(p) for p in agent.rglob("*") if p.is_file() and not p.is_symlink()}
    for p in (REPO / "packaging").rglob("*"):
        if p.is_file():
            hashes[p] = sha256_file(p)
    for p in (REPO / "systemd").iterdir():
        hashes[p] = sha256_file(p)
    date = dt.datetime.now(dt.UTC).date()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # gzip releases the GIL
        bundles = list(pool.map(lambda t: write_bundle(t, agent, runtime, out, date, hashes, args.version), tags))
    elapsed = time.monotonic() - start

    def tree_bytes(tree: Path) -> int:
        return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())

    info: dict[str, object] = {
        "version": args.version,
        "test_entry": str(test_entry.relative_to(REPO)) if test_entry is not None else None,
        "seconds": round(elapsed, 1),
        "runtime": {
            "glibc": runtime.glibc,
            "kernel_floor": runtime.kernel_floor,
            "loader": {"interp": runtime.loader, "bundled_as": f"{AGENT_RUNTIME}/{LOADER_NAME}"},
            "libraries": {name: asdict(lib) for name, lib in sorted(runtime.libraries.items())},
        },
        "agent_bytes": tree_bytes(agent),
        "bundles": {b.name: b.stat().st_size for b in bundles},
    }
    mib = 1024 * 1024
    print(
        f"C runtime: glibc {runtime.glibc} ({len(runtime.libraries)} files from the build host), kernel floor "
        f"{runtime.kernel_floor}"
    )
    if boot is not None and frozen.bootstrap_tree is not None:
        info["bootstrap_bytes"] = (out / "mobility-bootstrap").stat().st_size
        info["bootstrap_cache_id"] = boot[1]
        info["bootstrap_unpacked_bytes"] = tree_bytes(frozen.bootstrap_tree)
        print(
            f"mobility-bootstrap {args.version}: {info['bootstrap_bytes'] / mib:.1f} MiB "
            f"({info['bootstrap_unpacked_bytes'] / mib:.1f} MiB unpacked once); "
            f"frozen agent: {info['agent_bytes'] / mib:.1f} MiB unpacked"
        )
    else:
        print(f"bundles only, no bootstrapper{f' (test build: {args.test_entry})' if test_entry else ''}")
    (out / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
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
