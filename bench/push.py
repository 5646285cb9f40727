"""bench/push: wall time of `mobility-server push` to 1 host and to 20 hosts (target: 20 hosts <= 2x one host).

    .venv/bin/python bench/push.py [--hosts 20] [--runs 3]   (as root)

Each run boots a fresh lab (scripts/testlab.py): hosts+1 Debian 12 systems under systemd-nspawn, each in its own
network namespace with OpenSSH; the server and the push run in the lab's hub namespace. One host is pushed alone,
then the others all at once (--parallel = hosts). Every push is a full install: connect, checks over SFTP, copy
of the 13 MiB bundle, install, registration, daemon start. Also printed: the CPU time of the push process itself
and the spread of per-host times, because here every host shares this machine's cores with the others."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.localserver import init_local_server, start_local_server  # noqa: E402
from scripts.testlab import Lab, sshd_base_root  # noqa: E402


def push(lab: Lab, data: Path, address: str, hosts: list[str]) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds of the push process, per-host seconds)."""
    argv = [sys.executable, "-m", "server", "push", "--data", str(data), "--server", address, "--json"]
    argv += ["--key", str(lab.key), "--accept-new-host-keys", "--parallel", str(len(hosts))]
    argv += [a for h in hosts for a in ("--host", h)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(lab.in_hub(argv), capture_output=True, text=True, cwd=REPO, timeout=1800, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = json.loads(r.stdout)
    failed = [h for h in doc["hosts"] if h["state"] not in ("succeeded", "succeeded with warnings")]
    if r.returncode or failed:
        raise SystemExit(f"push failed: {json.dumps(failed, indent=2)[:4000]} {r.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, [h["seconds"] for h in doc["hosts"]]


def one_run(dist: Path, n: int) -> tuple[float, float, float, float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        work = Path(tmp)
        with Lab(work / "lab", sshd_base_root()) as lab:
            hosts = [lab.add_host(f"h{i}") for i in range(n + 1)]
            start = time.perf_counter()
            lab.boot(timeout=600)
            print(f"  booted {n + 1} hosts in {time.perf_counter() - start:.1f} s", flush=True)
            data = work / "data"
            init_local_server(data, lab.hub_address)
            bundles = [str(b) for b in dist.glob("*_DEBIAN12-64_*.tar.gz")]
            subprocess.run(
                [sys.executable, "-m", "server", "repo", "add", *bundles, "--data", str(data)],
                check=True,
                capture_output=True,
                cwd=REPO,
            )
            proc, address, _ = start_local_server(data, host=lab.hub_address, wrap=lab.in_hub([]))
            try:
                wall1, cpu1, _ = push(lab, data, address, [hosts[0].address])
                walln, cpun, each = push(lab, data, address, [h.address for h in hosts[1:]])
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    return wall1, cpu1, walln, cpun, each


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/push needs root (network namespaces, loop devices, systemd-nspawn)")
    dist = Path(tempfile.mkdtemp(prefix="bench-push-dist-"))
    subprocess.run(
        [str(REPO / "packaging" / "build"), "--tags", "DEBIAN12", "--out", str(dist)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    ones, manys, ratios = [], [], []
    for run in range(args.runs):
        wall1, cpu1, walln, cpun, each = one_run(dist, args.hosts)
        ones.append(wall1)
        manys.append(walln)
        ratios.append(walln / wall1)
        print(
            f"run {run + 1}: 1 host {wall1:.2f} s (push process CPU {cpu1:.2f} s); "
            f"{args.hosts} hosts {walln:.2f} s (push process CPU {cpun:.2f} s; per host median "
            f"{statistics.median(each):.2f} s, max {max(each):.2f} s); ratio {walln / wall1:.2f}",
            flush=True,
        )
    print(
        f"push to 1 host: median {statistics.median(ones):.2f} s; to {args.hosts} hosts: median "
        f"{statistics.median(manys):.2f} s; ratio median {statistics.median(ratios):.2f} (target <= 2.0); "
        f"{os.cpu_count()} cores shared by the server, the push and every host"
    )


if __name__ == "__main__":
    main()
