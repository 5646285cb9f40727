"""How a push shows its progress: a live table on a terminal (rich), a plain line per step otherwise, and
nothing but the final JSON document with --json."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from server.push.remote import HostResult

STYLE = {"succeeded": "green", "succeeded with warnings": "yellow", "failed": "red"}


class Progress(Protocol):
    def step(self, result: HostResult, text: str) -> None: ...

    def close(self) -> None: ...


class Quiet:
    """--json: the document at the end says it all."""

    def step(self, result: HostResult, text: str) -> None:
        return None

    def close(self) -> None:
        return None


class Lines:
    """One line per step, for logs and pipes."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def step(self, result: HostResult, text: str) -> None:
        extra = ""
        if text in STYLE:
            extra = f" ({result.error.id})" if result.error else ""
            extra += f" in {result.seconds:.1f} s"
        print(f"{result.target}: {text}{extra}", file=self.out, flush=True)

    def close(self) -> None:
        return None


class LiveTable:
    """A table with a row per host, redrawn as the hosts move along."""

    def __init__(self, console: Console | None = None) -> None:
        self.rows: dict[str, tuple[HostResult, str]] = {}  # by host: its result and its step now
        self.live = Live(console=console or Console(), get_renderable=self._table, refresh_per_second=4)
        self.live.start()

    def _table(self) -> Table:
        table = Table(title="mobility-server push", expand=False)
        for column in ("host", "OS", "step", "time", "result"):
            table.add_column(column)
        now = time.monotonic()
        for r, step in self.rows.values():
            done = r.state in STYLE
            seconds = r.seconds if done else now - r.started
            result = f"[{STYLE[r.state]}]{r.state}[/]" if done else ""
            if r.error:
                result += f" {r.error.id}"
            table.add_row(r.target, r.os_tag or "", "" if done else step, f"{seconds:.1f} s", result)
        return table

    def step(self, result: HostResult, text: str) -> None:
        self.rows[result.target] = (result, text)
        self.live.refresh()

    def close(self) -> None:
        self.live.stop()  # draws the final table once more


def progress_for(json_out: bool, out: TextIO = sys.stdout) -> Progress:
    if json_out:
        return Quiet()
    if out.isatty():
        return LiveTable()
    return Lines(out)
