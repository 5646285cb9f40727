"""bench/recovery: recovery measured on real VMs (scripts/vmlab, QEMU). Today: the power-on of a template clone to
registered and healthy, and the lab's image build, cold and warm. (RPO and RTO per point come with failover.)

    .venv/bin/python bench/recovery.py [--runs 3] [--os debian12] [--build] [--dist DIR]   (root)

A prepped template is made once as docs/templates.md says; then each run boots a new clone of it alone, and a last
run two clones together (the most this 2-core machine runs at once). Per clone, from QEMU's start (power-on): the
boot marker (multi-user.target reached), the machine enrolled on the server (its `enrolled_at`), and the first
healthy heartbeat (polled every 0.25 s in the server's database). `--build` also times the image build in a cache
of its own: cold (empty package cache: debootstrap downloads everything) and warm (packages cached, image rebuilt).
The accelerator QEMU used and the load average are printed with the figures: under TCG one clone keeps a host core
busy for most of its boot."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.vmlab import RECIPES, VM, Disk, Lab, accelerator, image  # noqa: E402
from scripts.vmlab.host import exit_on_sigterm  # noqa: E402
from scripts.vmlab.mobility import LabServer, make_template  # noqa: E402
from server.database import database_for  # noqa: E402
from server.datadir import DataDir  # noqa: E402
from server.storage import Storage  # noqa: E402


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed_build(name: str, cache: Path) -> tuple[float, dict[str, float]]:
    start = time.monotonic()
    built = image(RECIPES[name], progress=lambda _line: None, cache=cache)
    return time.monotonic() - start, dict(built.info["timings"])


def watch(server: LabServer, clones: dict[str, tuple[VM, float]]) -> dict[str, dict[str, float]]:
    """Per clone (name -> VM and its power-on wall time): seconds to its boot marker, its enrolment and its first
    healthy heartbeat."""
    storage = Storage.open(database_for(DataDir(server.data), None), pool_size=0)
    figures: dict[str, dict[str, float]] = {name: {} for name in clones}
    deadline = time.monotonic() + 900
    try:
        while any(len(f) < 3 for f in figures.values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"clones not registered and healthy within 15 min: {figures}")
            now = time.time()
            for m in storage.machines():
                if m.hostname not in clones:
                    continue
                f, (_, start) = figures[m.hostname], clones[m.hostname]
                f.setdefault("enrolled", m.enrolled_at - start)
                if m.health is not None and m.health.status == "healthy":
                    f.setdefault("healthy", now - start)
            for name, (vm, _) in clones.items():
                if "marker" not in figures[name] and vm.boots:
                    figures[name]["marker"] = vm.boots[-1].seconds
            time.sleep(0.25)
    finally:
        storage.close()
    return figures


def boot_clones(lab: Lab, server: LabServer, disk: Disk, names: list[str]) -> dict[str, dict[str, float]]:
    vms = [lab.vm(name, disk, server.spec(hostname=name)) for name in names]
    lab.start(*vms)
    clones = {vm.name: (vm, vm.started_wall) for vm in vms}
    for vm in vms:  # the boot markers are read by the console's own threads; record them as they come
        threading.Thread(target=vm.wait_booted, daemon=True).start()
    figures = watch(server, clones)
    for vm in vms:
        vm.poweroff()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--os", default="debian12", choices=sorted(RECIPES))
    parser.add_argument("--build", action="store_true", help="also time the image build, cold and warm")
    parser.add_argument("--dist", help="a packaging/build output to use (default: build one for --os)")
    args = parser.parse_args()
    exit_on_sigterm()
    if os.geteuid() != 0:
        raise SystemExit("bench/recovery.py needs root (loop devices, QEMU)")
    recipe = RECIPES[args.os]
    accel, why = accelerator()
    print(f"accelerator: {accel} ({why}); load average {load()}; {os.cpu_count()} cores")
    base = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        if args.build:
            cache = base / "build-cache"
            cold, phases = timed_build(args.os, cache)
            print(f"image build, cold: {cold:.0f} s ({phases}); load average {load()}")
            shutil.rmtree(cache / recipe.cache_name)
            warm, phases = timed_build(args.os, cache)
            print(f"image build, warm package cache: {warm:.0f} s ({phases}); load average {load()}")
        built = image(recipe)
        print(f"image {built.directory.name}: build recorded {built.info['timings']}")
        dist = Path(args.dist) if args.dist else base / "dist"
        if not args.dist:
            subprocess.run(
                [sys.executable, str(REPO / "packaging/build.py"), "--tags", recipe.os_tag, "--out", str(dist)],
                check=True,
                capture_output=True,
                cwd=REPO,
            )
        server = LabServer.start(base / "data", sorted(dist.glob(f"*_{recipe.os_tag}-64_*.tar.gz")), 10.0)
        try:
            with Lab(base / "lab") as lab:
                made = make_template(lab, built, server, dist)
                print(f"template made: {made.seconds}; load average {load()}")
                rows: list[tuple[str, dict[str, float]]] = []
                for n in range(args.runs):
                    rows += boot_clones(lab, server, made.prepped.disk, [f"alone-{n}"]).items()
                    print(f"  {rows[-1][0]}: {fmt(rows[-1][1])}; load average {load()}", flush=True)
                pair = boot_clones(lab, server, made.prepped.disk, ["pair-a", "pair-b"])
                for name, f in pair.items():
                    print(f"  {name}: {fmt(f)}; load average {load()}", flush=True)
        finally:
            server.stop()
        alone = [f for _, f in rows]
        print(f"\npower-on to registered and healthy, {recipe.name} clone under {accel} (-smp 1, 1 GiB):")
        for key, label in (("marker", "multi-user.target"), ("enrolled", "enrolled"), ("healthy", "healthy")):
            values = [f[key] for f in alone]
            both = [f[key] for f in pair.values()]
            print(
                f"  {label:18} alone: median {statistics.median(values):5.1f} s (min {min(values):.1f}, max "
                f"{max(values):.1f}, {len(values)} runs); two at once: {', '.join(f'{v:.1f}' for v in both)} s"
            )
        print(f"load average at the end: {load()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def fmt(f: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in sorted(f.items(), key=lambda kv: kv[1]))


if __name__ == "__main__":
    main()
