"""A recovered point that boots, for real: a point of the VM lab's Debian 12 disk (root on LVM and XFS, GRUB), with
recovery checks in its /etc/mobility/recovery.d, made through the agent's stream client; `test-failover --boot`
boots it under QEMU with no network, sees it reach multi-user.target, runs its checks (one passes and shows the
failover mark the machine was given, one fails with its output, one is skipped) and reports each step with its
time. Killed with -9 while the appliance prepares it and again as its VM boots, it leaves no VM behind, and the next
run sweeps what it left; `--keep` leaves the VM running with its console for the operator."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.shared.failover_mark import FailoverMark, oem_strings
from scripts.vmlab import DEBIAN12, image
from server.process.appliance import Appliance
from server.process.inspection import find_root, write_files
from tests.conftest import REPO, require_root
from tests.integration.points import point_of_images, register
from tests.integration.serverproc import ServerProcess, start_server

pytestmark = [pytest.mark.integration, pytest.mark.vm]

CHECKS = {
    # What the machine was given: its SMBIOS OEM strings, and its network interfaces (loopback only).
    "10-mark": (
        '#!/bin/sh\nfor f in /sys/firmware/dmi/entries/11-*/raw; do echo "oem $(base64 -w0 "$f")"; done\n'
        "echo \"nics $(ls /sys/class/net | tr '\\n' ' ')\"\n",
        0o755,
    ),
    "20-database": ("#!/bin/sh\necho 'checking the database'\necho 'the database is gone' >&2\nexit 3\n", 0o755),
    "README": ("Checks for test failovers: docs/replication.md\n", 0o644),
}


def processes_naming(where: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.pid != os.getpid() and any(str(where) in arg for arg in cmdline):
            found.append(proc)
    return found


def gone(where: Path, within: float = 20) -> list[str]:
    """What still runs naming ``where`` after ``within`` seconds (nothing, when a VM died with its command)."""
    deadline = time.monotonic() + within
    while (left := processes_naming(where)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [" ".join(p.info["cmdline"] or [])[:200] for p in left]


def areas_in(scratch: Path) -> list[str]:
    return sorted(p.name for p in scratch.iterdir() if p.name != ".lock") if scratch.exists() else []


def killed_when(server: ServerProcess, argv: list[str], scratch: Path, qemu_named: str | None) -> None:
    """``argv`` started, then killed with SIGKILL as soon as a QEMU of it runs (``qemu_named``: the one whose
    command line has that, else any): no VM of it may be left."""
    out = scratch.parent / "killed.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", *argv, "--data", str(server.data)], stdout=log, stderr=log, cwd=REPO
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            ended = proc.poll() is not None or time.monotonic() > deadline
            assert not ended, f"no VM of the run ever started: {out.read_text()[-3000:]}"
            running = [p.info["cmdline"] or [] for p in processes_naming(scratch)]
            if any(c[0].endswith("qemu-system-x86_64") and (qemu_named or "") in " ".join(c) for c in running if c):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert gone(scratch) == []


def test_a_point_boots_isolated_runs_its_checks_and_no_vm_outlives_a_killed_run(tmp_path: Path) -> None:
    require_root()
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(image(DEBIAN12).disk), str(disk)], check=True, timeout=600)
    disk.chmod(0o644)
    local = tmp_path / "checks"
    local.mkdir()
    files = {}
    for name, (text, mode) in CHECKS.items():
        (local / name).write_text(text)
        files[f"/etc/mobility/recovery.d/{name}"] = (local / name, mode)
    with Appliance([disk], tmp_path / "setup", writable=True) as appliance:  # the machine's own checks, installed
        appliance.launch()
        root, why = find_root(appliance)
        assert root is not None and root.device == "/dev/vg0/root", why
        write_files(appliance, root, files, {})
        appliance.close()

    server = start_server(tmp_path / "data", heartbeat_interval=2.0)
    try:
        paths, host_id = register(server, tmp_path, "db1", ["/dev/vda"])
        point_id = point_of_images(server, paths, {"/dev/vda": disk})
        disk.unlink()
        scratch = tmp_path / "scratch"
        argv = ["test-failover", "--machine", host_id, "--point", point_id, "--boot", "--scratch", str(scratch)]

        # kill -9 while the appliance writes the runner, then as the point's own VM starts: no VM is left either
        # time (their QEMUs die with the command), and each leaves its scratch area for the next run to sweep.
        killed_when(server, argv, scratch, None)
        (first,) = areas_in(scratch)
        killed_when(server, argv, scratch, "mobility-test-failover")
        (second,) = areas_in(scratch)
        assert second != first  # the second run swept the first's area

        r = subprocess.run(
            [sys.executable, "-m", "server", *argv, "--keep", "--json", "--data", str(server.data)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=1800,
            check=False,
        )
        assert r.returncode == 1 and "error TEST-FAILOVER-FAILED:" in r.stderr, r.stdout[-4000:] + r.stderr[-2000:]
        report, _ = json.JSONDecoder().raw_decode(r.stdout)
        vm = report["vm"]
        try:
            steps = {s["step"]: s for s in report["steps"]}
            assert list(steps) == [
                "materialise",
                "prepare",
                "boot",
                "check 10-mark",
                "check 20-database",
                "check README",
            ]
            assert all(s["ok"] for name, s in steps.items() if name != "check 20-database"), steps
            assert "/dev/vg0/root (xfs)" in steps["prepare"]["detail"]
            boot = steps["boot"]
            assert 0 < boot["guest_uptime"] < boot["seconds"] and "multi-user.target reached" in boot["detail"]
            assert 0 < report["rto_seconds"] <= report["seconds"]
            print(f"steps (s): {[(n, s['seconds']) for n, s in steps.items()]}; RTO {report['rto_seconds']} s")

            checks = {c["name"]: c for c in report["checks"]}
            assert checks["README"] == {"name": "README", "ok": None, "skipped": "not-executable"}
            failed = checks["20-database"]
            assert (failed["ok"], failed["exit"], failed["timed_out"]) == (False, 3, False)
            assert failed["output"] == "checking the database\nthe database is gone\n"
            assert "exit 3: the database is gone" in steps["check 20-database"]["detail"]
            # The machine was given the failover mark, and no network: loopback is all it has.
            said = checks["10-mark"]["output"].splitlines()
            strings = [s for line in said if line.startswith("oem ") for s in oem_strings(base64.b64decode(line[4:]))]
            marks = [m for m in map(FailoverMark.from_smbios, strings) if m is not None]
            assert marks == [FailoverMark("test", host_id, point_id)], said
            assert [line for line in said if line.startswith("nics ")] == ["nics lo "], said

            # The killed runs' areas were swept; the kept one holds the running VM, its console free for us.
            assert areas_in(scratch) == [Path(report["scratch"]).name]
            assert psutil.Process(vm["pid"]).is_running()
            directory = os.open(Path(vm["console"]).parent, os.O_RDONLY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
                console.settimeout(30)
                console.connect(f"/proc/self/fd/{directory}/console.sock")  # the path is longer than a socket's
                os.close(directory)
                console.sendall(b"\r")
                assert console.recv(4096), "the kept VM's console said nothing"
        finally:
            with_pid = psutil.Process(vm["pid"])
            with_pid.kill()
            with_pid.wait(timeout=30)
        assert gone(scratch) == []
        jobs = [j for j in server.jobs() if j["kind"] == "test-failover"]
        assert any(
            j["error_id"] == "TEST-FAILOVER-FAILED" and "check 20-database FAILED" in str(j["detail"]) for j in jobs
        )
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "scratch", ignore_errors=True)
