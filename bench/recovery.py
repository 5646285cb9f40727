"""bench/recovery: recovery measured on real VMs (scripts/vmlab, QEMU). The power-on of a template clone to
registered and healthy, and the lab's image build, cold and warm; with --failover, failover and test failovers of a
point of the lab's Debian 12 disk; with --database, a protected PostgreSQL under pgbench: its RPO, its RTO, and
what protection costs it.

    .venv/bin/python bench/recovery.py [--runs 3] [--os debian12] [--build] [--dist DIR]   (root)
    .venv/bin/python bench/recovery.py --failover [--runs 3]                                 (root)
    .venv/bin/python bench/recovery.py --database [--minutes 5] [--tps-seconds 60] [--dist DIR]

A prepped template is made once as docs/templates.md says; then each run boots a new clone of it alone, and a last
run two clones together (the most this 2-core machine runs at once). Per clone, from QEMU's start (power-on): the
boot marker (multi-user.target reached), the machine enrolled on the server (its `enrolled_at`), and the first
healthy heartbeat (polled every 0.25 s in the server's database). `--build` also times the image build in a cache
of its own: cold (empty package cache: debootstrap downloads everything) and warm (packages cached, image rebuilt).

`--failover` makes a point of the image's disk (4 GiB, root on LVM and XFS) through the agent's stream client, then
per run: `failover --format raw` and `--format qcow2` without the mark (the export: seconds per GiB of disk), `failover
--format qcow2` with it (the mark costs one appliance), `test-failover` (the filesystems checked in libguestfs's
appliance: its boot, each filesystem) and `test-failover --boot` (RTO: the command's start to multi-user.target in
the booted point, and the whole run). The accelerator QEMU used and the load average are printed with the figures:
under TCG a VM keeps a host core busy for most of its boot.

`--database`: the Debian 12 image with PostgreSQL 15, root LVM grown over a second disk, the agent bootstrapped.
pgbench (scale 5, 2 clients) runs `--tps-seconds` unprotected, then again once both disks are protected (policy: a
point every minute) and CONTINUOUS: tps with and without protection. Then pgbench runs `--minutes` while points are
cut, the age of the newest point sampled every 10 s; the source's plug is pulled (the disaster) and the age of the
newest point then is the **RPO achieved**. The **RTO** is from then to PostgreSQL answering in the failed-over VM:
`failover` writing the point's images, the VM's boot (its failover mark says test: it stays isolated, no network)
and PostgreSQL's crash recovery, each timed; then the recovery checks (`mobility recovery-check`: the PostgreSQL
check and its pg_amcheck) are timed too. Its steps are done here one by one so that each is timed."""

from __future__ import annotations

import argparse
import json
import os
import re
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

from scripts.vmlab import CRYPTO_CPU, DEBIAN12, RECIPES, VM, Disk, Lab, accelerator, image  # noqa: E402
from scripts.vmlab.guest import grow_root_onto  # noqa: E402
from scripts.vmlab.host import exit_on_sigterm  # noqa: E402
from scripts.vmlab.mobility import (  # noqa: E402
    MOBILITY,
    LabServer,
    boot_point,
    failover_mark,
    install_bootstrapper,
    make_template,
    wait_registered,
)
from server.database.connection import database_for  # noqa: E402
from server.database.storage import Storage  # noqa: E402
from server.datadir import DataDir  # noqa: E402
from tests.integration.points import point_of_images, register  # noqa: E402
from tests.integration.serverproc import start_server  # noqa: E402

GIB = 1 << 30


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
    parser.add_argument("--failover", action="store_true", help="failover and test failovers of a point instead")
    parser.add_argument("--database", action="store_true", help="RPO, RTO and tps of a protected PostgreSQL instead")
    parser.add_argument("--minutes", type=float, default=5.0, help="--database: minutes of load while points are cut")
    parser.add_argument("--tps-seconds", type=int, default=60, help="--database: each pgbench run for tps")
    args = parser.parse_args()
    exit_on_sigterm()
    if os.geteuid() != 0:
        raise SystemExit("bench/recovery.py needs root (loop devices, QEMU)")
    if args.failover:
        failover_figures(args.runs)
        return
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
        dist = Path(args.dist) if args.dist else base / "dist"
        if not args.dist:
            subprocess.run(
                [sys.executable, str(REPO / "packaging/build.py"), "--tags", recipe.os_tag, "--out", str(dist)],
                check=True,
                capture_output=True,
                cwd=REPO,
            )
        if args.database:
            database(base, dist, args.minutes, args.tps_seconds)
            return
        built = image(recipe)
        print(f"image {built.directory.name}: build recorded {built.info['timings']}")
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


def server_command(data: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "server", *args, "--data", str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=3600,
        check=False,
    )
    return time.monotonic() - started, r


def failover_figures(runs: int) -> None:
    accel, why = accelerator()
    print(f"accelerator: {accel} ({why}); load average {load()}; {os.cpu_count()} cores")
    base = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    server = start_server(base / "data", heartbeat_interval=10.0)
    try:
        disk = image(RECIPES["debian12"]).disk
        size, allocated = disk.stat().st_size, disk.stat().st_blocks * 512
        paths, host_id = register(server, base, "bench", ["/dev/vda"])
        started = time.monotonic()
        point_id = point_of_images(server, paths, {"/dev/vda": disk})
        print(
            f"point of {size / GIB:.1f} GiB ({allocated / GIB:.2f} GiB allocated) sent in "
            f"{time.monotonic() - started:.1f} s; load average {load()}"
        )
        point = ["--machine", host_id, "--point", point_id]
        figures: dict[str, list[float]] = {}
        for n in range(runs):
            for fmt, mark in (("raw", False), ("qcow2", False), ("qcow2", True)):
                out = base / f"out-{n}-{fmt}-{mark}"
                seconds, r = server_command(
                    server.data,
                    "failover",
                    *point,
                    "--out",
                    str(out),
                    "--format",
                    fmt,
                    *([] if mark else ["--no-mark"]),
                )
                assert r.returncode == 0, r.stderr
                name = f"failover --format {fmt}{' (marked)' if mark else ''}"
                figures.setdefault(name, []).append(seconds)
                shutil.rmtree(out)
            seconds, r = server_command(server.data, "test-failover", *point, "--json")
            report = json.loads(r.stdout)
            assert r.returncode == 0 and report["ok"], r.stdout[-2000:] + r.stderr[-2000:]
            figures.setdefault("test-failover (appliance), whole command", []).append(seconds)
            inspect = next(s for s in report["steps"] if s["step"] == "inspect")
            figures.setdefault("  of which the appliance's boot", []).append(inspect["appliance_boot"])
            figures.setdefault("  of which checking 2 filesystems", []).append(
                inspect["seconds"] - inspect["appliance_boot"]
            )
            seconds, r = server_command(server.data, "test-failover", *point, "--boot", "--json")
            report = json.loads(r.stdout)
            assert r.returncode == 0 and report["ok"], r.stdout[-2000:] + r.stderr[-2000:]
            steps = {s["step"]: s["seconds"] for s in report["steps"]}
            figures.setdefault("test-failover --boot: RTO (start to multi-user.target)", []).append(
                report["rto_seconds"]
            )
            figures.setdefault("  prepare (appliance: the check runner written)", []).append(steps["prepare"])
            figures.setdefault("  boot (QEMU's start to multi-user.target)", []).append(steps["boot"])
            figures.setdefault("  the whole command", []).append(seconds)
            print(f"  run {n}: {', '.join(f'{k.strip()} {v[-1]:.1f} s' for k, v in figures.items())}; load {load()}")
        print(f"\nfailover of a {size / GIB:.0f} GiB disk, {accel}, median of {runs} (min-max):")
        for name, values in figures.items():
            line = f"  {name:58} {statistics.median(values):6.1f} s ({min(values):.1f}-{max(values):.1f})"
            if name.startswith("failover --format") and "marked" not in name:
                line += (
                    f"; {statistics.median(values) / (size / GIB):.2f} s per GiB of disk, "
                    f"{statistics.median(values) / (allocated / GIB):.2f} s per GiB of data"
                )
            print(line)
        print(f"load average at the end: {load()}")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


PG = DEBIAN12.with_packages("pg", "postgresql-15")


def sh(vm: VM, command: str, timeout: float = 600.0) -> str:
    return vm.run(f"cd / && {command}", timeout=timeout).check(command[:80])  # postgres may not enter /root


def tps(vm: VM, seconds: int) -> float:
    """pgbench's own figure for ``seconds`` of 2 clients on the bench database."""
    out = sh(vm, f"runuser -u postgres -- pgbench -c 2 -j 1 -T {seconds} bench 2>&1", timeout=seconds + 300)
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if found is None:
        raise SystemExit(f"pgbench said: {out[-2000:]}")
    return float(found.group(1))


def newest_point(server: LabServer, host_id: str) -> dict[str, object] | None:
    points = json.loads(server.cli("points", "--machine", host_id, "--json").stdout)
    return max(points, key=lambda p: p["created"]) if points else None


def database(base: Path, dist: Path, minutes: float, seconds: int) -> None:
    """RPO and RTO of a protected PostgreSQL under pgbench, and its tps with and without protection."""
    built = image(PG)
    bundles = sorted(dist.glob("*_DEBIAN12-64_*.tar.gz"))
    server = LabServer.start(base / "db-data", bundles, heartbeat_interval=10.0)
    figures: dict[str, float] = {}
    try:
        with Lab(base / "db-lab") as lab:
            db = lab.vm("db", built, server.spec(hostname="db", blank_disks=(1024,), cpu=CRYPTO_CPU))
            lab.start(db)
            db.wait_booted()
            grow_root_onto(db, "/dev/vdb")
            install_bootstrapper(db, dist, server, server.token())
            db.ssh("systemctl start mobility-bootstrap.service", timeout=900)
            source = str(wait_registered(server, set(), "db")["host_id"])
            sh(db, "runuser -u postgres -- createdb bench && runuser -u postgres -- pgbench -i -q -s 5 bench", 900)
            figures["tps unprotected"] = tps(db, seconds)
            print(f"pgbench unprotected: {figures['tps unprotected']:.1f} tps; load average {load()}", flush=True)

            server.cli("policy", "set", "bench", "--interval", "1m", "--rpo", "5m")
            server.cli("protect", "--machine", source, "--all-disks", "--policy", "bench")
            t = time.monotonic()
            server.wait_continuous(source, 2, timeout=7200)
            figures["initial sync s"] = time.monotonic() - t
            print(f"initial sync of 4 + 1 GiB: {figures['initial sync s']:.0f} s; load average {load()}", flush=True)
            figures["tps protected"] = tps(db, seconds)
            print(f"pgbench protected: {figures['tps protected']:.1f} tps; load average {load()}", flush=True)

            sh(db, f"systemd-run --unit load --uid postgres pgbench -c 2 -j 1 -T {int(minutes * 60) + 600} bench")
            ages = []
            end = time.monotonic() + minutes * 60
            while time.monotonic() < end:
                time.sleep(10)
                newest = newest_point(server, source)
                if newest is not None:
                    ages.append(time.time() - float(str(newest["created"])))
            newest = newest_point(server, source)
            if newest is None:
                raise SystemExit("no point was cut under load")
            db.kill()  # the disaster: the source's plug pulled, pgbench mid-transaction
            disaster = time.monotonic()
            figures["RPO s"] = time.time() - float(str(newest["created"]))
            print(
                f"RPO achieved: {figures['RPO s']:.0f} s (newest point's age under load: median "
                f"{statistics.median(ages):.0f} s, max {max(ages):.0f} s over {len(ages)} samples); "
                f"load average {load()}"
            )

            point = str(newest["point_id"])
            images = server.fail_over(source, point, base / "failover")
            figures["failover images s"] = time.monotonic() - disaster
            vm = boot_point(lab, "failover", built, images, failover_mark("test", source, point), cpu=CRYPTO_CPU)
            lab.start(vm)
            boot = vm.wait_booted()
            figures["boot s"] = boot.seconds
            while (
                vm.run("cd / && runuser -u postgres -- psql -XAtq -d bench -c 'SELECT 1'", timeout=120).output.strip()
                != "1"
            ):
                time.sleep(1)
            figures["RTO s"] = time.monotonic() - disaster
            t = time.monotonic()
            report = vm.run(f"{MOBILITY} recovery-check --json", timeout=1800)
            figures["recovery checks s"] = time.monotonic() - t
            # the console may add lines after the document (a kernel message, the prompt)
            doc, _ = json.JSONDecoder().raw_decode(report.output[report.output.index("{") :])
            vm.poweroff()
    finally:
        server.stop()
    accel = accelerator()[0]
    print(f"\na protected PostgreSQL under pgbench (scale 5, 2 clients), {accel}, -smp 1, 1 GiB:")
    print(
        f"  tps: {figures['tps unprotected']:.1f} unprotected, {figures['tps protected']:.1f} protected "
        f"({100 * figures['tps protected'] / figures['tps unprotected']:.0f} %), a point every minute"
    )
    print(f"  RPO (age of the newest point at the disaster): {figures['RPO s']:.0f} s")
    print(
        f"  RTO (disaster to PostgreSQL answering): {figures['RTO s']:.0f} s = failover's images "
        f"{figures['failover images s']:.0f} s + boot to multi-user.target {figures['boot s']:.0f} s + the rest "
        f"(PostgreSQL's crash recovery)"
    )
    print(
        f"  recovery checks: {figures['recovery checks s']:.0f} s, "
        + ", ".join(f"{c['name']} {c['outcome']} ({c['seconds']} s)" for c in doc["checks"])
    )
    for c in doc["checks"]:
        if c["outcome"] != "passed":  # what it said, for the one who reads the figures
            said = str(c.get("output", "")).splitlines()[-30:]
            print(f"  {c['name']} said: {c.get('summary')}\n    " + "\n    ".join(said))
    print(f"load average at the end: {load()}")


def fmt(f: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in sorted(f.items(), key=lambda kv: kv[1]))


if __name__ == "__main__":
    main()
