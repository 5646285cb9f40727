"""bench/bootstrap: the frozen bootstrapper's at-boot no-op, and a fresh bootstrap on loopback excluding the
bundle download (the bundle is already in the machine's download cache; TUF metadata is still refreshed); the sizes
of the bootstrapper and the bundle.

    .venv/bin/python bench/bootstrap.py [--runs 5]

Fresh runs use `--root` sandbox machines (real Debian 12 release files, each its own machine-id): detect,
contact, verify, unpack, prerequisite checks, install, register, report; the daemon is enabled, not started. Each
fresh machine also starts with an empty bootstrapper cache, so its time includes the one-time unpack of the
bootstrapper's own runtime (a clone's first boot). The no-op runs on a machine that has bootstrapped (warm cache)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.localserver import init_local_server, start_local_server  # noqa: E402

TREES = REPO / "tests" / "resources" / "distros"


def machine(base: Path, name: str, data: Path, address: str, fingerprint: str, cache: Path | None) -> Path:
    root = base / name
    shutil.copytree(TREES / "debian12", root, symlinks=True)
    (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
    conf = root / "etc" / "mobility"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "passphrase").write_text((data / "passphrase").read_text())
    (conf / "passphrase").chmod(0o600)
    (conf / "bootstrap.conf").write_text(
        f"server = {address}\nfingerprint = {fingerprint}\npassphrase_file = /etc/mobility/passphrase\n"
    )
    if cache is not None:
        shutil.copytree(cache, root / "var" / "lib" / "mobility" / "downloads")
    return root


def timed(cmd: list[str], cache: Path | None = None) -> float:
    """Wall time of ``cmd``; the bootstrapper unpacks its runtime into ``cache`` (never the real /var/lib/mobility)."""
    env = {**os.environ, "MOBILITY_BOOTSTRAP_CACHE": str(cache)} if cache is not None else None
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-bootstrap-"))
    dist = base / "dist"  # the frozen programs of these sources (cached by their hash), one bundle re-packed
    subprocess.run(
        [str(REPO / "packaging" / "build"), "--tags", "DEBIAN12", "--out", str(dist)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    bootstrapper = str(dist / "mobility-bootstrap")
    data = base / "data"
    init_local_server(data)
    subprocess.run(
        [sys.executable, "-m", "server", "repo", "add", "--data", str(data), str(bundle)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    server, address, fingerprint = start_local_server(data)
    caches = base / "caches"
    try:
        first = machine(base, "first", data, address, fingerprint, None)
        with_download = timed([bootstrapper, "--root", str(first)], caches / "first")
        cache = first / "var" / "lib" / "mobility" / "downloads"
        fresh = [
            timed(
                [bootstrapper, "--root", str(machine(base, f"m{i}", data, address, fingerprint, cache))],
                caches / f"m{i}",
            )
            for i in range(args.runs)
        ]
        unpack_once = [timed([bootstrapper, "--version"], caches / f"unpack{i}") for i in range(5)]
        runs = max(args.runs * 2, 10)
        noop = [timed([bootstrapper, "--root", str(first)], caches / "first") for _ in range(runs)]
        # For comparison: the same no-op by the frozen agent of the bundle (its launcher, then the one-dir program).
        agent = REPO / "build" / "packaging" / "frozen" / "mobility" / "mobility"
        noop_agent = [timed([str(agent), "bootstrap", "--root", str(first)]) for _ in range(runs)]
        version_only = [timed([bootstrapper, "--version"], caches / "first") for _ in range(runs)]
    finally:
        server.terminate()
        server.wait(timeout=15)
    mib = 1024 * 1024
    info = json.loads((dist / "build-info.json").read_text())
    size = bundle.stat().st_size / mib
    shutil.rmtree(base, ignore_errors=True)  # machines, caches and the build: half a GiB
    print(f"first bootstrap, {size:.1f} MiB bundle downloaded on loopback: {with_download:.2f} s")
    print(
        f"fresh bootstrap excluding download ({args.runs} machines, each unpacking the bootstrapper's runtime once): "
        f"median {statistics.median(fresh):.2f} s (min {min(fresh):.2f}, max {max(fresh):.2f}); target <= 3 s"
    )
    print(
        f"at-boot no-op, frozen bootstrapper ({len(noop)} runs): median {statistics.median(noop) * 1000:.0f} ms "
        f"(min {min(noop) * 1000:.0f}, max {max(noop) * 1000:.0f}); target <= 300 ms"
    )
    print(
        f"  of which the start-up alone (`mobility-bootstrap --version`, cache warm): median "
        f"{statistics.median(version_only) * 1000:.0f} ms"
    )
    print(
        f"  the same no-op by the bundle's frozen agent (`mobility bootstrap`): median "
        f"{statistics.median(noop_agent) * 1000:.0f} ms"
    )
    print(
        f"bootstrapper's one-time unpack of its runtime ({info['bootstrap_unpacked_bytes'] / mib:.1f} MiB, "
        f"`--version` with an empty cache): median {statistics.median(unpack_once) * 1000:.0f} ms"
    )
    print(
        f"sizes: mobility-bootstrap {info['bootstrap_bytes'] / mib:.1f} MiB as downloaded (target <= 20 MiB); "
        f"{bundle.name} {size:.1f} MiB; frozen agent {info['agent_bytes'] / mib:.1f} MiB "
        f"unpacked; bundled C runtime glibc {info['runtime']['glibc']}, kernel floor {info['runtime']['kernel_floor']}"
    )


if __name__ == "__main__":
    main()
