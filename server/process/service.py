"""The process server role as `serve` runs it: the chunk store under DATA/process, the stream listener, and the
machines' protection read from the server's database (which disks a machine may send, how many points it keeps)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.datadir import DataDir
from server.errors import ListenFailed
from server.process.gc import collect
from server.process.receiver import Receiver, stream_tls_context
from server.process.store import DEFAULT_RESERVE, ChunkStore
from server.storage import Storage

log = logging.getLogger("mobility.process")

DEFAULT_PORT = 9444
COLLECT_EVERY = 600.0  # seconds between garbage collections of the chunk store


def store_dir(data: DataDir) -> Path:
    return data.root / "process"


@dataclass(frozen=True)
class ProcessOptions:
    host: str
    port: int = DEFAULT_PORT
    reserve: int = DEFAULT_RESERVE
    announce: str | None = None  # the host agents reach it at (None: the configuration server's own address)


class Protections:
    """The protection table, read from the receiver's threads through its own connection."""

    def __init__(self, database: Path) -> None:
        self.storage = Storage(database)
        self.lock = threading.Lock()

    def authorize(self, host_id: str, disk: str) -> bool:
        with self.lock:
            row = self.storage.protection(host_id)
        return row is not None and row.covers(disk)

    def retention(self, host_id: str) -> int | None:
        with self.lock:
            row = self.storage.protection(host_id)
            policy = self.storage.policy(row.policy) if row else None
        return policy.retention if policy else None

    def close(self) -> None:
        self.storage.close()


class ProcessService:
    """Store + receiver + protection lookups; ``start`` binds the listener, ``close`` stops it cleanly."""

    def __init__(self, data: DataDir, options: ProcessOptions) -> None:
        self.data = data
        self.options = options
        self.store = ChunkStore(store_dir(data), writer=True, reserve=options.reserve)
        self.protections = Protections(data.database)
        self.receiver = Receiver(self.store, self.protections.authorize, self._after_point)
        self.port = options.port
        self._collected = -COLLECT_EVERY

    def _after_point(self, host_id: str, point_id: str) -> None:
        keep = self.protections.retention(host_id)
        if keep is not None:
            dropped = self.store.prune(host_id, keep)
            if dropped:
                log.info("%s: %d recovery points past the retention of %d dropped", host_id, dropped, keep)
                now = time.monotonic()
                if now - self._collected >= COLLECT_EVERY:  # it pauses commits: not after every point
                    self._collected = now
                    collect(self.store)  # the chunks only the dropped points held go too

    async def start(self) -> int:
        context = stream_tls_context(str(self.data.ca_cert), str(self.data.tls_cert), str(self.data.tls_key))
        try:
            self.port = await self.receiver.start(self.options.host, self.options.port, context)
        except OSError as e:
            raise ListenFailed(f"cannot listen on {self.options.host}:{self.options.port}: {e.strerror}") from e
        return self.port

    async def close(self) -> None:
        await self.receiver.close()
        self.store.close()
        self.protections.close()
