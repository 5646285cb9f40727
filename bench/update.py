"""bench/update: self-update figures (needs root), with real frozen bundles on sandbox machines whose daemons run.

    .venv/bin/python bench/update.py [--machines 20] [--heartbeat 10] [--only rollout,rollback,adverse]

1. Rollout: N machines (bootstrapped from the 0.1.0 bootstrapper against a server on loopback, heartbeat every
   second, health every second, a 3 s settle time) get `mobility-server update --to 0.1.1 --all --wave 25%`: the
   time from the command to the rollout completed (every machine verified on 0.1.1), per wave.
2. Rollback: one machine at the default health window and settle time, the server's heartbeat interval at
   --heartbeat (10 s): a version that crashes at start (0.1.2), one that reports CRITICAL (0.1.3) and one that never
   reaches the server (0.1.4). The time from the broken version's start (the watcher restarting the daemon into
   it) to the previous version running again (its daemon's own record, a live PID), and from `update` to the rollout
   halted. The goal: under 60 s each.
3. No false rollbacks: the same rollout of a good version to N machines, each with a protected disk (a loop device)
   replicated to a process server of its own, while the clock of five of them steps five minutes ahead as each
   switches (and back a minute later, as NTP corrects it) and the process server is stopped (SIGSTOP) for two
   minutes from the first switch. Counted: rollbacks (the goal: none), and the time to the rollout completed.

The bundles come from packaging/build (0.1.0 and 0.1.1 from the release programs, the broken ones from the test-only
entry point tests/integration/broken_agent.py), built into a temporary directory (the frozen programs are cached)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.polling import wait_for  # noqa: E402
from tests.integration.fleet import Lab, Machine, bundle_of, stepped_clock  # noqa: E402

BROKEN = REPO / "tests" / "integration" / "broken_agent.py"


def build(out: Path) -> dict[str, Path]:
    releases = {}
    for version, extra in (
        ("0.1.0", []),
        ("0.1.1", ["--bundles-only"]),
        ("0.1.2", ["--test-entry", str(BROKEN)]),
        ("0.1.3", ["--test-entry", str(BROKEN)]),
        ("0.1.4", ["--test-entry", str(BROKEN)]),
    ):
        where = out / version
        cmd = [sys.executable, str(REPO / "packaging/build.py"), "--out", str(where), "--version", version]
        r = subprocess.run([*cmd, "--tags", "DEBIAN12", *extra], capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"packaging/build {version} failed: {r.stderr[-2000:]}")
        releases[version] = where
    return releases


def rollout(tmp: Path, releases: dict[str, Path], n: int) -> None:
    lab = Lab(tmp / "fleet", releases, {"health_seconds": 1, "update_settle_seconds": 3}, heartbeat=1.0)
    try:
        t = time.monotonic()
        machines = lab.add(n)
        print(f"{n} machines bootstrapped in {time.monotonic() - t:.1f} s")
        for m in machines:
            m.start()
        wait_for("the daemons", lambda: all(m.status().get("heartbeats_sent", 0) >= 2 for m in machines), 120)
        lab.publish("0.1.1")
        start = time.monotonic()
        lab.cli("update", "--to", "0.1.1", "--all", "--wave", "25%")
        waves: dict[int, float] = {}
        while True:
            r = lab.rollout()
            for member in r["machines"]:
                wave = member["wave"]
                if wave not in waves and all(x["state"] == "succeeded" for x in r["machines"] if x["wave"] == wave):
                    waves[wave] = time.monotonic() - start
            if r["state"] != "running":
                break
            if time.monotonic() - start > 900:
                raise SystemExit("the rollout did not end in 15 minutes")
            time.sleep(0.5)
        total = time.monotonic() - start
        assert r["state"] == "completed", r
        assert all(m.running() == "0.1.1" for m in machines)
        print(
            f"rollout of 0.1.1 to {n} machines in {r['waves']} waves of {r['wave_size']}: all on 0.1.1 "
            f"{total:.1f} s after `update` (waves done at "
            + ", ".join(f"{waves[w]:.1f}" for w in sorted(waves))
            + " s)"
        )
    finally:
        lab.close()


def rollback(tmp: Path, releases: dict[str, Path], heartbeat: float, version: str) -> None:
    lab = Lab(tmp / f"rollback-{version}", releases, {}, heartbeat=heartbeat)
    try:
        (m,) = lab.add(1)
        m.start()
        wait_for("the daemon", lambda: m.status().get("heartbeats_sent", 0) >= 2, 120)
        lab.publish(version)
        t0 = time.monotonic()
        lab.cli("update", "--to", version, "--all")
        rolled = wait_for(
            "the rollback", lambda: _rolled_back(m, version), 600, every=0.2, most=0.2
        )  # its time is measured
        halted = wait_for("the halt", lambda: lab.rollout()["state"] == "halted", 120)
        took = time.monotonic() - t0
        error = m.record()["outcome"]["error_id"]
        print(
            f"{version} ({error}), heartbeat {heartbeat:g} s: previous version running again {rolled:.1f} s after the "
            f"broken one started; rollout halted {took:.1f} s after `update`" + ("" if halted else "?")
        )
    finally:
        lab.close()


def _rolled_back(m: Machine, version: str) -> float | None:
    record = m.record()
    status = m.status()
    if record.get("to_version") != version or record.get("phase") != "rolled-back" or m.running() != "0.1.0":
        return None
    return float(status["started"]) - float(record["restarted_at"])


def _switching(m: Machine) -> bool:
    record = m.record()
    return record.get("to_version") == "0.1.1" and record.get("phase") in ("switching", "restarting", "watching")


def adverse(tmp: Path, releases: dict[str, Path], n: int, stepped: int = 5, stop_for: float = 120.0) -> None:
    """A good version through clock steps and a stopped process server: no rollback may happen."""
    lab = Lab(tmp / "adverse", releases, {"health_seconds": 1, "update_settle_seconds": 3}, process_apart=True)
    assert lab.process is not None
    try:
        machines = lab.add(n)
        # One machine of each wave, then the first wave's second (waves go in host-ID order).
        ordered = sorted(machines, key=lambda m: m.host_id())
        size = max(1, -(-n * 25 // 100))
        names = list(dict.fromkeys(m.name for m in [*ordered[::size], *ordered[1:2]]))[:stepped]
        chosen = [m for m in machines if m.name in names]
        clocks: dict[str, Path] = {}
        for m in machines:
            lab.protect(m, 8 << 20)
            if m.name in names:
                clocks[m.name] = tmp / f"clock-{m.name}"
                m.env = stepped_clock(clocks[m.name])
            m.start()
        wait_for("the daemons", lambda: all(m.status().get("heartbeats_sent", 0) >= 2 for m in machines), 180)
        wait_for(
            "every disk in CONTINUOUS",
            lambda: all(
                [d.get("state") for d in m.state("replication/status.json").get("disks", [])] == ["CONTINUOUS"]
                for m in machines
            ),
            600,
        )
        lab.publish("0.1.1")
        start = time.monotonic()
        lab.cli("update", "--to", "0.1.1", "--all", "--wave", "25%")
        stepped_at: dict[str, float] = {}
        stopped_at: float | None = None
        resumed_at: float | None = None
        steps_seen = 0
        waves: dict[int, float] = {}
        r = lab.rollout()
        while r["state"] == "running":
            now = time.monotonic()
            for member in r["machines"]:
                wave = member["wave"]
                if wave not in waves and all(x["state"] == "succeeded" for x in r["machines"] if x["wave"] == wave):
                    waves[wave] = now - start
            if stopped_at is None and any(_switching(m) for m in machines):
                lab.process.proc.send_signal(signal.SIGSTOP)
                stopped_at = now
            if stopped_at is not None and resumed_at is None and now - stopped_at >= stop_for:
                lab.process.proc.send_signal(signal.SIGCONT)
                resumed_at = now
            for m in chosen:
                if m.name not in stepped_at and _switching(m):
                    clocks[m.name].write_text("300\n")  # five minutes ahead, in its health window
                    stepped_at[m.name] = now
                elif m.name in stepped_at and now - stepped_at[m.name] >= 60 and clocks[m.name].read_text() != "0\n":
                    clocks[m.name].write_text("0\n")  # NTP steps it back
                if m.health_of("HLT-CLOCK-SKEW") == "FAIL":
                    steps_seen += 1
            if now - start > 1800:
                raise SystemExit("the rollout did not end in 30 minutes")
            time.sleep(0.2)
            r = lab.rollout()
        total = time.monotonic() - start
        for member in r["machines"]:
            waves.setdefault(member["wave"], total)  # the last wave ended with the rollout
        if resumed_at is None:
            lab.process.proc.send_signal(signal.SIGCONT)
        rollbacks = [m.name for m in machines if "rolling back" in m.log()]
        failed = [x for x in r["machines"] if x["state"] != "succeeded"]
        print(
            f"rollout of 0.1.1 to {n} protected machines, {len(stepped_at)} clocks stepped 5 min ahead in their "
            f"health windows (HLT-CLOCK-SKEW seen failing: {'yes' if steps_seen else 'no'}), the process server "
            f"stopped for {((resumed_at or time.monotonic()) - (stopped_at or start)):.0f} s: {r['state']} "
            f"{total:.1f} s after `update`; rollbacks: {len(rollbacks)} {rollbacks or ''}; members not succeeded: "
            f"{len(failed)}; waves done at " + ", ".join(f"{waves[w]:.1f}" for w in sorted(waves)) + " s "
            f"(the process server stopped at {(stopped_at or start) - start:.1f} s, clocks stepped at "
            + ", ".join(f"{t - start:.1f}" for t in sorted(stepped_at.values()))
            + " s and back a minute later each)"
        )
        if rollbacks or failed or r["state"] != "completed":
            raise SystemExit(f"false rollbacks or failures: {rollbacks} {failed}")
    finally:
        lab.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--heartbeat", type=float, default=10.0, help="the server's interval for the rollback figure")
    parser.add_argument("--only", default="rollout,rollback,adverse", help="which parts, comma-separated")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if os.geteuid() != 0:
        raise SystemExit("bench/update.py needs root (the sandbox machines' cgroups)")
    with tempfile.TemporaryDirectory(prefix="mobility-bench-update-") as tmp:
        releases = build(Path(tmp) / "dist")
        print(json.dumps({v: str(bundle_of(releases, v).name) for v in releases}))
        print(f"load average at the start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        if "rollout" in parts:
            rollout(Path(tmp), releases, args.machines)
        if "rollback" in parts:
            for version in ("0.1.2", "0.1.3", "0.1.4"):
                rollback(Path(tmp), releases, args.heartbeat, version)
        if "adverse" in parts:
            adverse(Path(tmp), releases, args.machines)
        print(f"load average at the end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
