"""The chunk store's maintenance thread: retention and collection, never on the ingest path.

The committer acknowledges a batch first and then tells this thread which machines closed points (``point_closed``:
a set and a notify, nothing more). Here, for each of them, the machine's retention is looked up in the server's
database and its points beyond it are dropped (``ChunkStore.prune``: their rows, in one short transaction); then a
collection runs in slices that each hold the store's write lock briefly (server/process/gc.py). Sweeps follow every
prune; compaction runs at most every ``COMPACT_EVERY`` seconds, and once when the thread starts (what a stop or a
kill left). Borg and restic keep prune out of their backup path the same way: the data path never waits for it.

The same thread sweeps the scratch areas of test failovers whose command is gone (a kill -9 leaves full copies of a
point's disks: server/process/scratch.py), at start and every ``SWEEP_EVERY`` seconds, so that a killed run's GiBs
do not wait for the next run to be removed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.process.gc import Collector
from server.process.scratch import sweep
from server.process.store import ChunkStore

log = logging.getLogger("mobility.process")

COMPACT_EVERY = 600.0  # seconds between compactions (each looks at the unreferenced chunks, and only them)
SWEEP_EVERY = 60.0  # seconds between sweeps of dead test failovers' scratch areas (a scandir and a try-lock each)

Retention = Callable[[str], int | None]  # a machine's host ID -> how many points it keeps (None: no policy)


class Maintenance(threading.Thread):
    def __init__(
        self,
        store: ChunkStore,
        retention: Retention,
        *,
        compact_every: float = COMPACT_EVERY,
        scratch: Path | None = None,
        sweep_every: float = SWEEP_EVERY,
    ) -> None:
        super().__init__(name="process-maintenance", daemon=True)
        self.store = store
        self.retention = retention
        self.compact_every = compact_every
        self.scratch = scratch  # the default scratch root of test failovers (an operator's --scratch is theirs)
        self.sweep_every = sweep_every
        self._swept = -sweep_every
        self._hosts: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._compacted = -compact_every
        self.collector = Collector(store, stopping=lambda: self._stopping, pause=self._pause)
        self.runs = 0  # collections finished (tests wait for them)
        self.last_error: Exception | None = None

    def point_closed(self, host_id: str) -> None:
        """From the committer, after the acknowledgements: apply the machine's retention soon."""
        with self._cond:
            self._hosts.add(host_id)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.is_alive():
            self.join(timeout=30)
        self.collector.close()

    def _pause(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)

    def run(self) -> None:
        due = True  # what a stop or a kill left undone
        while True:
            with self._cond:
                while not self._hosts and not self._stopping and not due and not self._sweep_due():
                    self._cond.wait(min(self.compact_every, self.sweep_every))
                    due = time.monotonic() - self._compacted >= self.compact_every and self._pending()
                if self._stopping:
                    return
                hosts, self._hosts = sorted(self._hosts), set()
            if self._sweep_due():
                self._sweep()
            if not hosts and not due:
                continue
            try:
                self._turn(hosts)
                self.last_error = None
            except Exception as e:  # the store or the database failing: logged once, tried again at the next turn
                if self.last_error is None or type(self.last_error) is not type(e):
                    log.exception("store maintenance failed")
                self.last_error = e
                self._pause(5.0)
            due = False
            self.runs += 1

    def _sweep_due(self) -> bool:
        return self.scratch is not None and time.monotonic() - self._swept >= self.sweep_every

    def _sweep(self) -> None:
        self._swept = time.monotonic()
        if self.scratch is None or not self.scratch.is_dir():
            return
        try:
            sweep(self.scratch)  # logs what it removed
        except OSError as e:  # a scratch root we cannot read: said, and tried again at the next sweep
            log.warning("could not sweep the scratch areas under %s: %s", self.scratch, e.strerror or e)

    def _turn(self, hosts: list[str]) -> None:
        for host in hosts:
            if self._stopping:
                return
            keep = self.retention(host)
            if keep is not None:
                dropped = self.store.prune(host, keep)
                if dropped:
                    log.info("%s: %d recovery points past the retention of %d dropped", host, dropped, keep)
        compact = time.monotonic() - self._compacted >= self.compact_every
        self.collector.run(compact=compact)
        if compact:
            self._compacted = time.monotonic()

    def _pending(self) -> bool:
        """Whether sweeps wait, or unreferenced chunks lie in packs (a compaction may be worth its look)."""
        db = self.store.reader_db
        return bool(
            db.execute("SELECT 1 FROM sweeps LIMIT 1").fetchone()
            or db.execute("SELECT 1 FROM chunks WHERE refs = 0 LIMIT 1").fetchone()
        )
