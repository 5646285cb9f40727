"""The recovery checks' runner and its report: the runner itself runs here, on the host, with a checks directory and
a report file of the test's (the places are the only difference from the guest's: tests/integration/
test_vm_failover.py runs it in a booted point); every line it writes must parse, and hostile lines must not."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from server.process.recovery_checks import (
    MAX_NAME,
    OUTPUT_BYTES,
    BadLine,
    Event,
    parse,
    runner_text,
    timed_out,
    unit_text,
)

NONCE = "0123456789abcdef"
HOST, POINT = str(uuid.uuid4()), str(uuid.uuid4())


def run_runner(tmp_path: Path, checks: dict[str, tuple[str, int]], timeout: int = 30) -> list[Event]:
    """The runner over a checks directory of ``checks`` (name -> script, mode); the events it reported."""
    checks_dir = tmp_path / "recovery.d"
    checks_dir.mkdir()
    for name, (text, mode) in checks.items():
        (checks_dir / name).write_text(text)
        (checks_dir / name).chmod(mode)
    report = tmp_path / "report"
    report.write_bytes(b"")
    runner = tmp_path / "run"
    runner.write_text(
        runner_text(
            NONCE, POINT, HOST, timeout, checks_dir=str(checks_dir), report=str(report), work=str(tmp_path / "out")
        )
    )
    sh = shutil.which("dash") or "/bin/sh"  # the shell Debian guests run /bin/sh as
    r = subprocess.run([sh, str(runner)], capture_output=True, timeout=120, check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    events = []
    for line in report.read_bytes().splitlines():
        event = parse(line, NONCE)
        assert event is not None, line
        events.append(event)
    return events


def test_the_runner_runs_each_check_in_order_and_reports_what_it_did(tmp_path: Path) -> None:
    events = run_runner(
        tmp_path,
        {
            "10-env": (
                '#!/bin/sh\necho "$MOBILITY_FAILOVER $MOBILITY_FAILOVER_POINT $MOBILITY_FAILOVER_SOURCE $PWD"\n',
                0o755,
            ),
            "20-fails": ("#!/bin/sh\necho first line\necho 'it broke' >&2\nexit 3\n", 0o755),
            "30-reads-stdin": ("#!/bin/sh\ncat; echo read-nothing\n", 0o755),
            "README": ("words\n", 0o644),
            ".hidden": ("#!/bin/sh\nexit 1\n", 0o755),
            "x.dpkg-old": ("#!/bin/sh\nexit 1\n", 0o755),
            "has space": ("#!/bin/sh\nexit 1\n", 0o755),
            "40-loud": ("#!/bin/sh\nhead -c 40000 /dev/zero | tr '\\0' a; echo; echo the end\n", 0o755),
        },
    )
    kinds = [(e.kind, e.name) for e in events]
    assert kinds[0] == ("BOOTED", "") and kinds[-1] == ("DONE", ""), kinds
    assert kinds[1:-1] == [
        ("BEGIN", "10-env"),
        ("END", "10-env"),
        ("BEGIN", "20-fails"),
        ("END", "20-fails"),
        ("BEGIN", "30-reads-stdin"),
        ("END", "30-reads-stdin"),
        ("BEGIN", "40-loud"),
        ("END", "40-loud"),
        ("SKIP", "README"),
        ("SKIP", "has space"),
        ("SKIP", "x.dpkg-old"),
    ]
    ends = {e.name: e for e in events if e.kind == "END"}
    assert (ends["10-env"].exit, ends["10-env"].output) == (0, f"test {POINT} {HOST} /\n")
    assert (ends["20-fails"].exit, ends["20-fails"].output) == (3, "first line\nit broke\n")
    assert ends["30-reads-stdin"].output == "read-nothing\n"  # stdin is /dev/null: it did not wait
    loud = ends["40-loud"].output
    assert len(loud.encode()) == OUTPUT_BYTES and loud.endswith("a\nthe end\n")  # the last 16 KiB
    skipped = {e.name: e.why for e in events if e.kind == "SKIP"}
    assert skipped == {"README": "not-executable", "has space": "name", "x.dpkg-old": "name"}
    assert all(0 <= e.end - e.start < 30 for e in ends.values())


def test_a_check_past_its_timeout_is_stopped_and_fails(tmp_path: Path) -> None:
    events = run_runner(tmp_path, {"10-hangs": ("#!/bin/sh\necho waiting\nexec sleep 300\n", 0o755)}, timeout=1)
    (end,) = [e for e in events if e.kind == "END"]
    assert timed_out(end.exit) and end.output == "waiting\n" and end.end - end.start < 15
    assert events[-1].kind == "DONE"


def test_a_machine_without_checks_boots_and_says_so(tmp_path: Path) -> None:
    events = run_runner(tmp_path, {})
    assert [e.kind for e in events] == ["BOOTED", "DONE"]


def line(kind: str, **fields: str) -> bytes:
    return f"MOBILITY-TEST-FAILOVER {NONCE} {kind} {' '.join(f'{k}={v}' for k, v in fields.items())}".strip().encode()


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def test_report_lines_parse_into_events_and_hostile_ones_are_refused() -> None:
    assert parse(line("BOOTED", uptime="26.5", failed=b64("a.service\nb.mount")), NONCE) == Event(
        "BOOTED", uptime=26.5, failed_units=("a.service", "b.mount")
    )
    end = parse(line("END", name=b64("10-pg"), exit="1", start="30.1", end="31.4", output=b64("bad\n")), NONCE)
    assert end == Event("END", name="10-pg", exit=1, start=30.1, end=31.4, output="bad\n")
    # Not ours: another run's nonce, the console's noise, our prefix without a nonce.
    for other in (line("DONE", uptime="1").replace(NONCE.encode(), b"f" * 16), b"login: ", b"MOBILITY-TEST-FAILOVER"):
        assert parse(other, NONCE) is None
    hostile = [
        line("END", name=b64("x"), exit="256", start="1", end="2", output=""),
        line("END", name=b64("x"), exit="-1", start="1", end="2", output=""),
        line("END", name=b64("x"), exit="0", start="nan", end="2", output=""),
        line("END", name=b64("x"), exit="0", start="1e300", end="2", output=""),
        line("END", name=b64("x"), exit="0", start="1", end="2", output=b64(b"a" * (OUTPUT_BYTES + 3))),
        line("END", name="!!notbase64", exit="0", start="1", end="2", output=""),
        line("BEGIN", name=b64("n" * (MAX_NAME + 3))),
        line("SKIP", name=b64("x"), why="because"),
        line("REBOOT"),
        line("BOOTED", uptime="1", uptime2="2"),
        line("DONE", uptime="1", extra="1 2"),
        line("BEGIN", name=b64("a"), name2=b64("b")).replace(b"name2", b"name"),
        f"MOBILITY-TEST-FAILOVER {NONCE} DONE uptime=1\xff".encode("latin-1"),
    ]
    for bad in hostile:
        with pytest.raises(BadLine):
            parse(bad, NONCE)


def test_the_runner_takes_only_plain_values_and_the_unit_runs_it_after_multi_user() -> None:
    with pytest.raises(ValueError):
        runner_text("not-a-nonce", POINT, HOST, 10)
    with pytest.raises(ValueError):
        runner_text(NONCE, POINT, HOST, 10, checks_dir="/etc/$(reboot)")
    unit = unit_text(POINT)
    assert "After=multi-user.target" in unit and "WantedBy=multi-user.target" in unit and "Type=oneshot" in unit
    assert os.path.basename(runner_text(NONCE, POINT, HOST, 10).splitlines()[0]) == "sh"  # #!/bin/sh
