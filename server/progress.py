"""How a long command shows how far it got: bytes done, the rate and the time left, as a bar on the terminal
(`failover`, `test-failover`, `verify`, `repo add` of a large bundle). Drawn on stderr, so stdout stays the
command's result; nothing at all with --json or when stderr is not a terminal (a pipe, a log, a test).

The work reports to a ``Progress``: ``task`` for each piece (a disk, a bundle) with its size, ``advance`` as bytes
are done. The commands pass ``progress_for(args.json)``; the library code takes any Progress (Quiet by default)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID


class Progress(Protocol):
    def task(self, description: str, total: int) -> None:
        """A new piece of work of ``total`` bytes (the previous one is done)."""

    def advance(self, done: int) -> None:
        """``done`` more bytes of the current piece."""

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None: ...


class Quiet:
    """--json, a pipe, a log: nothing."""

    def task(self, description: str, total: int) -> None:
        return None

    def advance(self, done: int) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Bar:
    """A rich progress bar per piece: description, bar, bytes done of the total, rate, time left."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("{task.description}", markup=False),  # a name is text, never rich markup
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=False,
            refresh_per_second=4,
        )
        self._task: TaskID | None = None
        self._progress.start()

    def task(self, description: str, total: int) -> None:
        self._task = self._progress.add_task(description, total=max(total, 1))

    def advance(self, done: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, done)

    def close(self) -> None:
        self._progress.stop()  # the bars stay as they ended: whole, or where an error stopped them

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def progress_for(json_out: bool, stream: TextIO | None = None) -> Progress:
    """A bar on a terminal; Quiet with --json or when ``stream`` (stderr) is not a terminal."""
    stream = stream if stream is not None else sys.stderr
    if json_out or not stream.isatty():
        return Quiet()
    return Bar(stream)
