"""bench/push: wall time of `mobility-server push` to 1 host and to 20 hosts (target: 20 hosts <= 2x one host).

    .venv/bin/python bench/push.py [--hosts 20] [--runs 3]   (as root)

Each run boots a fresh lab (scripts/testlab.py): hosts+1 Debian 12 systems under systemd-nspawn, each in its own
network namespace with OpenSSH; the server and the push run in the lab's hub namespace. One host is pushed alone,
then the others all at once (--parallel = hosts). Every push is a full install: connect, checks over SFTP, copy
of the 13 MiB bundle, install, registration, daemon start. Also printed: the CPU time of the push process itself
the server and each host (its container's cgroup), and the per-host times: here every host shares this machine's
cores with the others, so the CPU work alone sets a floor on the 20-host time that separate machines would not."""

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
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.localserver import init_local_server, start_local_server  # noqa: E402
from scripts.testlab import Host, Lab, sshd_base_root  # noqa: E402


@dataclass
class Pushed:
    wall: float  # seconds, the whole push command
    push_cpu: float  # CPU seconds of the push process
    server_cpu: float  # CPU seconds of the configuration server during the push
    host_cpu: list[float]  # CPU seconds each host (its whole container: sshd, tar, the agent, systemd) used
    each: list[float]  # each host's own push time as the push reports it

    def floor(self, cores: int) -> float:
        """The least wall time the CPU work of this push can take on ``cores`` cores shared by all of it."""
        return (self.push_cpu + self.server_cpu + sum(self.host_cpu)) / cores


def _cpu_of_process(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _cpu_of_host(host: Host) -> float:
    for cgroup in host.cgroups:
        stat = cgroup / "cpu.stat"
        if stat.exists():
            return int(stat.read_text().split("usage_usec ", 1)[1].split()[0]) / 1e6
    raise SystemExit(f"{host.name}: no cpu.stat in its cgroups {host.cgroups}")


def push(lab: Lab, data: Path, address: str, server_pid: int, hosts: list[Host]) -> Pushed:
    argv = [sys.executable, "-m", "server", "push", "--data", str(data), "--server", address, "--json"]
    argv += ["--key", str(lab.key), "--accept-new-host-keys", "--parallel", str(len(hosts))]
    argv += [a for h in hosts for a in ("--host", h.address)]
    hosts_before = [_cpu_of_host(h) for h in hosts]
    server_before = _cpu_of_process(server_pid)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(lab.in_hub(argv), capture_output=True, text=True, cwd=REPO, timeout=1800, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = json.loads(r.stdout)
    failed = [h for h in doc["hosts"] if h["state"] not in ("succeeded", "succeeded with warnings")]
    if r.returncode or failed:
        raise SystemExit(f"push failed: {json.dumps(failed, indent=2)[:4000]} {r.stderr[-2000:]}")
    return Pushed(
        wall,
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        _cpu_of_process(server_pid) - server_before,
        [_cpu_of_host(h) - b for h, b in zip(hosts, hosts_before, strict=True)],
        [h["seconds"] for h in doc["hosts"]],
    )


def one_run(dist: Path, n: int) -> tuple[Pushed, Pushed]:
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
                one = push(lab, data, address, proc.pid, hosts[:1])
                many = push(lab, data, address, proc.pid, hosts[1:])
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    return one, many


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
    cores = os.cpu_count() or 1
    ones, manys, ratios, bound = [], [], [], []
    for run in range(args.runs):
        one, many = one_run(dist, args.hosts)
        ones.append(one.wall)
        manys.append(many.wall)
        ratios.append(many.wall / one.wall)
        bound.append(many.wall / max(one.wall, many.floor(cores)))
        print(
            f"run {run + 1}: 1 host {one.wall:.2f} s (CPU: push {one.push_cpu:.2f} s, server {one.server_cpu:.2f} s, "
            f"host {one.host_cpu[0]:.2f} s)\n"
            f"       {args.hosts} hosts {many.wall:.2f} s (CPU: push {many.push_cpu:.2f} s, server "
            f"{many.server_cpu:.2f} s, hosts median {statistics.median(many.host_cpu):.2f} s, total "
            f"{sum(many.host_cpu):.1f} s; per-host time median {statistics.median(many.each):.2f} s, max "
            f"{max(many.each):.2f} s)\n"
            f"       ratio {many.wall / one.wall:.2f}; the CPU work alone needs {many.floor(cores):.1f} s on {cores} "
            f"cores: {args.hosts} hosts took {bound[-1]:.2f}x max(1 host, that floor)",
            flush=True,
        )
    print(
        f"push to 1 host: median {statistics.median(ones):.2f} s; to {args.hosts} hosts: median "
        f"{statistics.median(manys):.2f} s; ratio median {statistics.median(ratios):.2f} (target <= 2.0); "
        f"against the CPU floor of {cores} shared cores: median {statistics.median(bound):.2f}x"
    )


if __name__ == "__main__":
    main()
