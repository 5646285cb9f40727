"""The process server role as `serve` runs it: the chunk store under DATA/process, the stream listener, and the
machines' protection read from the server's database (which disks a machine may send, how many points it keeps)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.shared.errors import MobilityError
from server.api.edge import Connections
from server.database.connection import Database
from server.database.storage import Storage
from server.datadir import DataDir
from server.errors import ListenFailed, NotProtected, UnknownMachine
from server.process.maintenance import Maintenance
from server.process.receiver import Receiver, stream_tls_context
from server.process.store import DEFAULT_RESERVE, ChunkStore

log = logging.getLogger("mobility.process")

DEFAULT_PORT = 9444


def store_dir(data: DataDir) -> Path:
    return data.root / "process"


def scratch_dir(data: DataDir) -> Path:
    """Where test failovers and failovers' marking work unless told otherwise (``--scratch``)."""
    return store_dir(data) / "scratch"


@dataclass(frozen=True)
class ProcessOptions:
    host: str
    port: int = DEFAULT_PORT
    reserve: int = DEFAULT_RESERVE
    announce: str | None = None  # the host agents reach it at (None: the configuration server's own address)
    announce_port: int | None = None  # ... and its port there (None: the port it listens on)


class Protections:
    """The server's database as the receiver's threads read it (a small pool of their own): whose certificate is
    still good, which disks a machine may send, how many points it keeps."""

    def __init__(self, db: Database) -> None:
        self.storage = Storage.open(db, pool_size=2)

    def authorize(self, host_id: str, serial: str, disk: str) -> bool:
        """Whether the machine whose certificate (CN ``host_id``, ``serial``) opened a stream may send ``disk``.
        A removed or revoked machine, or a certificate a renewal replaced, is refused with its error (as the API
        refuses it); the renewed certificate's first use makes it the current one."""
        credential = self.storage.present_certificate(host_id, serial)
        return credential.protection is not None and credential.protection.covers(disk)

    def recheck(self, streams: Sequence[tuple[str, str, str]]) -> list[MobilityError | None]:
        """For each open stream's (host ID, certificate serial, disk): the error that ends it now, or None. One
        query per 500 machines, by primary key (``credentials``, as the heartbeats are checked)."""
        hosts = sorted({host for host, _, _ in streams})
        found = {}
        for i in range(0, len(hosts), 500):
            found.update(self.storage.credentials(hosts[i : i + 500]))
        verdicts: list[MobilityError | None] = []
        for host, serial, disk in streams:
            credential = found.get(host)
            try:
                if credential is None:
                    raise UnknownMachine(f"host {host} is not registered (or was removed)")
                credential.verify(serial)  # CERT-REVOKED, CERT-SUPERSEDED
                if credential.protection is None or not credential.protection.covers(disk):
                    raise NotProtected(f"{disk} of machine {host} is no longer protected")
            except MobilityError as e:
                verdicts.append(e)
                continue
            verdicts.append(None)
        return verdicts

    def retention(self, host_id: str) -> int | None:
        row = self.storage.protection(host_id)
        return row.policy.retention if row else None

    def close(self) -> None:
        self.storage.close()


class ProcessService:
    """Store + receiver + protection lookups; ``start`` binds the listener, ``close`` stops it cleanly."""

    def __init__(
        self, data: DataDir, db: Database, options: ProcessOptions, connections: Connections | None = None
    ) -> None:
        self.data = data
        self.options = options
        self.store = ChunkStore(store_dir(data), writer=True, reserve=options.reserve)
        try:
            self.protections = Protections(db)
        except BaseException:
            self.store.close()
            raise
        self.maintenance = Maintenance(self.store, self.protections.retention, scratch=scratch_dir(data))
        self.receiver = Receiver(
            self.store,
            self.protections.authorize,
            self._after_point,
            recheck=self.protections.recheck,
            connections=connections,
        )
        self.port = options.port

    def _after_point(self, host_id: str, point_id: str) -> None:
        """From the committer, once the batch is acknowledged: retention and collection run in their own thread."""
        self.maintenance.point_closed(host_id)

    async def start(self) -> int:
        context = stream_tls_context(str(self.data.ca_cert), str(self.data.tls_cert), str(self.data.tls_key))
        try:
            self.port = await self.receiver.start(self.options.host, self.options.port, context)
        except OSError as e:
            raise ListenFailed(f"cannot listen on {self.options.host}:{self.options.port}: {e.strerror}") from e
        self.maintenance.start()
        return self.port

    async def close(self) -> None:
        await self.receiver.close()
        await asyncio.to_thread(self.maintenance.stop)
        self.store.close()
        self.protections.close()
