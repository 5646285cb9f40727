"""`./demo`, the README's main job, as a newcomer runs it (root): the bootstrap, then the whole recovery loop on a
loop-device disk of the demo machine, a point, its test failover in libguestfs's appliance and the records recovered;
and whatever ends it (the end of `--no-wait`, Ctrl-C while the server runs on), nothing of it is left: no process, no
mount, no loop device, no tracing instance. The records check itself is pure and tested here too."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from agent.host.paths import Paths
from agent.replication.tracing import TRACEFS, instance_name
from scripts.demo_records import Ack, check, read_log
from tests.conftest import REPO, require_root

DEMO = REPO / ".demo"
RECOVERED = re.compile(
    r"^records recovered: 1\.\.(\d+) of (\d+) written before the point; newest acknowledged before the point: (\d+)$",
    re.M,
)


def leftovers() -> list[str]:
    """What a demo run left on this machine: processes naming .demo/, mounts under it (in any process's mount
    namespace: the demo makes its own), loop devices over its files, the demo machine's tracing instance."""
    demo = str(DEMO)
    found = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            found += [f"{mountinfo}: {line}" for line in mountinfo.read_text().splitlines() if demo in line]
        except OSError:  # the process ended
            continue
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text()
        except OSError:
            continue
        if demo in name:
            found.append(f"{backing.parent.parent.name}: {name.strip()}")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(demo in arg for arg in proc.info["cmdline"] or ()):
                found.append(f"process {proc.pid}: {' '.join(proc.info['cmdline'])[:200]}")
        except psutil.Error:
            continue
    instance = TRACEFS / "instances" / instance_name(Paths((DEMO / "root").resolve()).state_dir)
    if instance.exists():
        found.append(f"tracing instance {instance}")
    return found


def assert_recovered(out: str) -> None:
    m = RECOVERED.search(out)
    assert m, out[-4000:]
    count, of, acked = (int(g) for g in m.groups())
    assert count == of and count >= acked >= 1, m.group(0)
    assert "/dev/loop" in out and ": CONTINUOUS" in out and "(crash-consistent)" in out, out[-4000:]
    assert "inspected in the appliance" in out and "fsck clean, mount ok" in out and "\nPASSED\n" in out, out[-4000:]


@pytest.mark.integration
def test_demo_no_wait_ends_with_the_records_recovered_and_leaves_nothing_behind() -> None:
    require_root()
    r = subprocess.run(
        [str(REPO / "demo"), "--no-wait"], capture_output=True, text=True, cwd=REPO, timeout=1800, check=False
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert_recovered(r.stdout)
    assert "dashboard" not in r.stdout.rsplit("records recovered:", 1)[1]  # --no-wait ends there
    assert leftovers() == []


@pytest.mark.integration
def test_demo_serves_the_dashboard_until_ctrl_c_then_cleans_up() -> None:
    require_root()
    # Its own session, as a terminal's foreground job: Ctrl-C goes to the whole group.
    proc = subprocess.Popen(
        [str(REPO / "demo")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out: list[str] = []
    url = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            m = re.match(r"dashboard and /metrics: (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "".join(out)[-4000:]
        assert_recovered("".join(out))
        # The dashboard is up and shows the demo machine's protected disk and the test failover that passed.
        with urllib.request.urlopen(f"{url}/api/protection", timeout=30) as answer:  # noqa: S310 - our own loopback server
            protection = json.loads(answer.read())
        assert "demo-source" in json.dumps(protection) and "/dev/loop" in json.dumps(protection), protection
        time.sleep(3)  # still running: the server, the daemon and the writer run on until Ctrl-C
        assert proc.poll() is None and leftovers() != []
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
        assert proc.returncode == 0, "".join(out)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert leftovers() == []


def acks(n: int, start: float = 1000.0) -> list[Ack]:
    """Records 1..n, one a second: record i begun at start+i, acknowledged at start+i+0.5."""
    return [Ack(i, start + i, start + i + 0.5) for i in range(1, n + 1)]


def records(n: int, first: int = 1) -> bytes:
    return b"".join(f"{i} {1000.0 + i:.6f}\n".encode() for i in range(first, n + 1))


def test_a_point_with_every_acknowledged_record_passes() -> None:
    # Frozen at 1010.7: records 1..10 acknowledged before it; thawed at 1011.2: record 11 was begun before the thaw
    # (its write in the freeze window may be in or out).
    for held in (10, 11):
        result = check(records(held), acks(20), 1010.7, 1011.2)
        assert result.ok and (result.count, result.acked_before, result.begun_before_thaw) == (held, 10, 11)
        assert result.line() == (
            f"records recovered: 1..{held} of {held} written before the point; newest acknowledged before the point: 10"
        )


def test_a_point_missing_an_acknowledged_record_or_holding_a_later_one_fails() -> None:
    missing = check(records(9), acks(20), 1010.7, 1011.2)
    assert missing.problems == ["records 10..10 were acknowledged before the freeze and are missing"]
    later = check(records(12), acks(20), 1010.7, 1011.2)
    assert later.problems == ["records 12..12 were begun after the thaw and are in the point"]
    torn = check(records(10) + b"11 1011.0", acks(20), 1010.7, 1011.2)
    assert torn.problems == ["the last record is torn: b'11 1011.0'"]
    gap = check(records(4) + records(10, first=6), acks(20), 1010.7, 1011.2)
    assert gap.count == 4 and gap.problems[0].startswith("record 5 is not where it belongs: b'6 ")
    assert not check(b"", acks(3), 1010.0, 1011.0).ok  # records 1..2 acknowledged before the freeze
    assert check(b"", [], 1010.0, 1011.0).ok  # nothing written, nothing owed


def test_the_writers_log_skips_a_line_being_written() -> None:
    assert read_log("1 1.000000 1.100000\n2 2.000000 2.1") == [Ack(1, 1.0, 1.1)]
