"""bench/update: self-update figures (needs root), with real frozen bundles on sandbox machines whose daemons run.

    .venv/bin/python bench/update.py [--machines 20] [--heartbeat 10]

1. Rollout: N machines (bootstrapped from the 0.1.0 bootstrapper against a server on loopback, heartbeat every
   second, health every second, a 3 s settle time) get `mobility-server update --to 0.1.1 --all --wave 25%`: the
   time from the command to the rollout completed (every machine verified on 0.1.1), per wave.
2. Rollback: one machine at the default health window and settle time, the server's heartbeat interval at
   --heartbeat (10 s): a version that crashes at start (0.1.2) and one that reports CRITICAL (0.1.3). The time from
   the broken version's start (the watcher restarting the daemon into it) to the previous version running again
   (its daemon's own record, a live PID), and from `update` to the rollout halted.

The bundles come from packaging/build (0.1.0 and 0.1.1 from the release programs, the broken ones from the test-only
entry point tests/integration/broken_agent.py), built into a temporary directory (the frozen programs are cached)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.polling import wait_for  # noqa: E402
from tests.integration.fleet import Lab, Machine, bundle_of  # noqa: E402

BROKEN = REPO / "tests" / "integration" / "broken_agent.py"


def build(out: Path) -> dict[str, Path]:
    releases = {}
    for version, extra in (
        ("0.1.0", []),
        ("0.1.1", ["--bundles-only"]),
        ("0.1.2", ["--test-entry", str(BROKEN)]),
        ("0.1.3", ["--test-entry", str(BROKEN)]),
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--heartbeat", type=float, default=10.0, help="the server's interval for the rollback figure")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/update.py needs root (the sandbox machines' cgroups)")
    with tempfile.TemporaryDirectory(prefix="mobility-bench-update-") as tmp:
        releases = build(Path(tmp) / "dist")
        print(json.dumps({v: str(bundle_of(releases, v).name) for v in releases}))
        rollout(Path(tmp), releases, args.machines)
        for version in ("0.1.2", "0.1.3"):
            rollback(Path(tmp), releases, args.heartbeat, version)


if __name__ == "__main__":
    main()
