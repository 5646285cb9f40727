"""The machine's own recovery checks in a booted point (`test-failover --boot`), server side: the runner written into
the scratch copy of the point before it boots, and the report it sends back, parsed. Pure: no I/O here.

The contract a check is written to (docs/replication.md, "Recovery checks"):

- a check is an executable regular file in ``/etc/mobility/recovery.d/`` of the machine, named with letters, digits,
  ``_``, ``-`` and ``.`` only (not starting with a dot, not ``*.dpkg-*``, not ``*~``: as run-parts takes them); the
  others are reported as skipped, with why;
- they run one at a time in the order of their names, as root, once the machine reached ``multi-user.target``, with
  stdin from /dev/null, in ``/``, with ``MOBILITY_FAILOVER=test``, ``MOBILITY_FAILOVER_POINT`` (the point's ID) and
  ``MOBILITY_FAILOVER_SOURCE`` (the source machine's host ID) in their environment;
- exit status 0 is a pass, anything else a failure; a check still running after the timeout (`--check-timeout`,
  default 600 s) gets SIGTERM, then SIGKILL 10 s later, and fails (exit 124 or 137);
- what it prints (stdout and stderr together) is its message: the last 16 KiB are reported.

The runner is a POSIX shell script run by a oneshot systemd unit ordered after ``multi-user.target`` (so its first
line is also how we see that the machine booted: neither the kernel's console settings nor a login of the customer's
image are needed). It reports on the second serial port (/dev/ttyS1), which nothing else in the guest writes to, one
line per event, each ``MOBILITY-TEST-FAILOVER <nonce> EVENT key=value ...``, names and output base64-encoded so that
no guest text can make a line of its own. A hostile machine can lie about its own checks (they are its own); it
cannot make us read more than the bounds below."""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass

UNIT = "mobility-test-failover.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
WANTS_LINK = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"
RUNNER_DIR = "/etc/mobility/test-failover"
RUNNER_PATH = f"{RUNNER_DIR}/run"
CHECKS_DIR = "/etc/mobility/recovery.d"
REPORT_DEVICE = "/dev/ttyS1"  # the VM's second serial port: nothing but the runner writes there
WORK_DIR = "/run/mobility-test-failover"
OUTPUT_BYTES = 16 << 10  # the tail of each check's output that is reported
MAX_CHECKS = 64  # checks reported; more are run and reported as not read
MAX_NAME = 255
DEFAULT_CHECK_TIMEOUT = 600
_WORD = re.compile(r"[A-Z]{2,8}")
_PAIR = re.compile(r"([a-z_]{1,16})=([A-Za-z0-9+/=.:-]*)")


def unit_text(point_id: str) -> str:
    return f"""\
# Written by `mobility-server test-failover --boot` into a throwaway copy of point {point_id}: never into a point or
# a failover's images.
[Unit]
Description=Mobility test failover: report the boot and run /etc/mobility/recovery.d
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh {RUNNER_PATH}
TimeoutStartSec=infinity
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


def runner_text(
    nonce: str,
    point_id: str,
    host_id: str,
    check_timeout: int,
    *,
    checks_dir: str = CHECKS_DIR,
    report: str = REPORT_DEVICE,
    work: str = WORK_DIR,
) -> str:
    """The runner (POSIX sh, coreutils and systemctl): the boot line, each check's, and the end. The places are the
    guest's; a test runs it on the host with its own."""
    if not re.fullmatch(r"[0-9a-f]{16}", nonce):
        raise ValueError("nonce")
    for value in (point_id, host_id, checks_dir, report, work):
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", value):
            raise ValueError(f"{value!r} in the runner")
    return f"""\
#!/bin/sh
# Written by `mobility-server test-failover --boot` into a throwaway copy of point {point_id}.
# It reports on /dev/ttyS1 (server/process/recovery_checks.py says how), which only the server reads.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
LC_ALL=C
export LC_ALL
R={report}
OUT={work}
stty -F "$R" raw -echo 2>/dev/null
say() {{ printf 'MOBILITY-TEST-FAILOVER {nonce} %s\\n' "$*" >> "$R"; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
b64() {{ base64 | tr -d '\\n'; }}
failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | cut -d' ' -f1 | head -n 50)
say "BOOTED uptime=$(up) failed=$(printf %s "$failed" | b64)"
mkdir -p "$OUT"
for f in {checks_dir}/*; do
  [ -e "$f" ] || continue
  name=${{f##*/}}
  n=$(printf %s "$name" | b64)
  case "$name" in
    .*|*~|*.dpkg-*|*[!A-Za-z0-9_.-]*) say "SKIP name=$n why=name"; continue ;;
  esac
  if [ ! -f "$f" ] || [ ! -x "$f" ]; then say "SKIP name=$n why=not-executable"; continue; fi
  start=$(up)
  say "BEGIN name=$n"
  (cd / && export MOBILITY_FAILOVER=test MOBILITY_FAILOVER_POINT={point_id} MOBILITY_FAILOVER_SOURCE={host_id} &&
    exec timeout -k 10 {check_timeout} "$f") </dev/null >"$OUT/output" 2>&1
  rc=$?
  say "END name=$n exit=$rc start=$start end=$(up) output=$(tail -c {OUTPUT_BYTES} "$OUT/output" | b64)"
done
say "DONE uptime=$(up)"
"""


@dataclass(frozen=True)
class Event:
    """One line of the runner's report."""

    kind: str  # BOOTED, SKIP, BEGIN, END, DONE
    name: str = ""
    why: str = ""
    exit: int = 0
    start: float = 0.0
    end: float = 0.0
    uptime: float = 0.0
    output: str = ""
    failed_units: tuple[str, ...] = ()


class BadLine(ValueError):
    """A report line that claims to be ours and does not parse."""


def _b64(value: str, limit: int, what: str) -> bytes:
    if len(value) > (limit + 2) // 3 * 4:
        raise BadLine(f"{what} is longer than {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadLine(f"{what} is not base64") from e


def _seconds(value: str, what: str) -> float:
    try:
        n = float(value)
    except ValueError as e:
        raise BadLine(f"{what} is not a number") from e
    if not math.isfinite(n) or not 0 <= n < 1e9:
        raise BadLine(f"{what} is out of range")
    return n


def parse(line: bytes, nonce: str) -> Event | None:
    """The event a report line carries; None for a line that is not the runner's (another boot's nonce, noise);
    BadLine for one of ours that does not parse."""
    head = f"MOBILITY-TEST-FAILOVER {nonce} ".encode()
    if not line.startswith(head):
        return None
    try:
        text = line[len(head) :].decode("ascii")
    except UnicodeDecodeError as e:
        raise BadLine("not ASCII") from e
    kind, _, rest = text.partition(" ")
    if not _WORD.fullmatch(kind):
        raise BadLine(f"event {kind[:20]!r}")
    fields: dict[str, str] = {}
    for token in rest.split(" ") if rest else []:
        m = _PAIR.fullmatch(token)
        if m is None or m.group(1) in fields:
            raise BadLine(f"field {token[:40]!r}")
        fields[m.group(1)] = m.group(2)
    name = _b64(fields.get("name", ""), MAX_NAME, "name").decode("utf-8", "replace")
    if kind == "BOOTED":
        units = _b64(fields.get("failed", ""), 16 << 10, "failed units").decode("utf-8", "replace")
        return Event(kind, uptime=_seconds(fields.get("uptime", ""), "uptime"), failed_units=tuple(units.split()[:50]))
    if kind == "DONE":
        return Event(kind, uptime=_seconds(fields.get("uptime", ""), "uptime"))
    if kind == "SKIP":
        why = fields.get("why", "")
        if why not in ("name", "not-executable"):
            raise BadLine(f"skipped for {why[:20]!r}")
        return Event(kind, name=name, why=why)
    if kind == "BEGIN":
        return Event(kind, name=name)
    if kind == "END":
        try:
            code = int(fields.get("exit", ""))
        except ValueError as e:
            raise BadLine("exit is not a number") from e
        if not 0 <= code <= 255:
            raise BadLine("exit is out of range")
        output = _b64(fields.get("output", ""), OUTPUT_BYTES, "output").decode("utf-8", "replace")
        return Event(
            kind,
            name=name,
            exit=code,
            start=_seconds(fields.get("start", ""), "start"),
            end=_seconds(fields.get("end", ""), "end"),
            output=output,
        )
    raise BadLine(f"event {kind}")


def timed_out(code: int) -> bool:
    """What `timeout` exits with when it stopped the check: 124 (SIGTERM did it) or 137 (SIGKILL did)."""
    return code in (124, 137)
