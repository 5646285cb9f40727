"""The demo's workload and what it proves: a writer that appends numbered records to a file on the protected disk,
each one fsynced before the next, and logs (on the host, off the disk) when each write began and when its fsync
returned; and the check of the records a recovery point holds against that log.

A record is one line, ``<n> <unix time>``. What a crash-consistent point promises, in these terms: every record
acknowledged (fsync returned) before the freeze is in it, none begun after the thaw is, and the file holds records
1..K with nothing torn or out of order (a record written during the freeze window may be in or out, whole).

Run as a script: ``python -m scripts.demo_records LOG FILE`` until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACE = 0.1  # seconds between records: a steady trickle the dashboard can show, a small file after hours


@dataclass(frozen=True)
class Ack:
    n: int
    began: float  # wall clock, before the write
    acked: float  # wall clock, after its fsync returned


@dataclass
class Recovered:
    count: int  # records 1..count, in order, in the point
    acked_before: int  # the newest record acknowledged before the freeze (0: none)
    begun_before_thaw: int  # the newest record begun before the thaw: none after it may be in the point
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return (
            f"records recovered: 1..{self.count} of {self.count} written before the point; newest acknowledged "
            f"before the point: {self.acked_before}"
        )


def writer(log_path: Path, file: Path) -> None:
    stop = False

    def on_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    out = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    while not stop:
        n += 1
        began = time.time()
        os.write(out, f"{n} {began:.6f}\n".encode())
        os.fsync(out)
        acked = time.time()
        os.write(log, f"{n} {began:.6f} {acked:.6f}\n".encode())
        time.sleep(PACE)
    os.close(out)
    os.close(log)


def read_log(text: str) -> list[Ack]:
    acks = []
    for line in text.split("\n")[:-1]:  # whole lines only: the one being written when the log was read may be partial
        n, began, acked = line.split()
        acks.append(Ack(int(n), float(began), float(acked)))
    return acks


def check(recovered: bytes, acks: list[Ack], frozen_at: float, thawed_at: float) -> Recovered:
    """The records of ``recovered`` (the file as the point holds it) against the writer's log, for a point frozen at
    ``frozen_at`` and thawed at ``thawed_at`` (pure)."""
    acked_before = max((a.n for a in acks if a.acked < frozen_at), default=0)
    begun_before_thaw = max((a.n for a in acks if a.began < thawed_at), default=0)
    result = Recovered(0, acked_before, begun_before_thaw)
    lines = recovered.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        result.problems.append(f"the last record is torn: {lines[-1][:60]!r}")
        lines.pop()
    for expected, raw in enumerate(lines, 1):
        parts = raw.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != expected:
            result.problems.append(f"record {expected} is not where it belongs: {raw[:60]!r}")
            break
        result.count = expected
    if result.count < acked_before:
        result.problems.append(
            f"records {result.count + 1}..{acked_before} were acknowledged before the freeze and are missing"
        )
    if result.count > begun_before_thaw:
        result.problems.append(
            f"records {begun_before_thaw + 1}..{result.count} were begun after the thaw and are in the point"
        )
    return result


if __name__ == "__main__":
    writer(Path(sys.argv[1]), Path(sys.argv[2]))
