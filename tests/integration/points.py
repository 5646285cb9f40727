"""Recovery points made from disk image files, for the failover tests: a registered machine sends an image's bytes
as one of its disks through the agent's own stream client (real TLS with the machine's certificate, the process
server's real checks), then closes a point. Only the image's non-zero chunks travel (holes are skipped with
SEEK_DATA): the replica of a new disk is zero until a chunk says otherwise, as for a real initial sync."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.registration import authenticated_client
from agent.replication.chunks import Geometry, RootHasher, chunk_hash, zero_hash
from agent.replication.stream import Stream
from agent.shared.address import ServerAddress
from agent.shared.replication_wire import Codec, Hello, Kind, PointClose
from tests.integration.serverproc import ServerProcess, configure_root, open_storage, sandbox_root, secret_file

CHUNK = 64 * 1024


def register(server: ServerProcess, workdir: Path, name: str, disks: list[str]) -> tuple[Paths, str]:
    """A machine enrolled with ``server`` (its own key and certificate in a sandbox root), protecting ``disks``."""
    root = sandbox_root(workdir / name, os.urandom(16).hex())
    code, out = configure_root(server, root, secret_file(workdir / f"{name}.pass", server.passphrase()))
    assert code == 0, out
    host_id = str(out["host_id"])
    storage = open_storage(server.data)
    try:
        storage.protect(host_id, disks, False, "default", False, time.time())
    finally:
        storage.close()
    return Paths(root), host_id


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    ranges, at = [], 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole from here
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, end))
        at = end
    return ranges


def point_of_images(server: ServerProcess, paths: Paths, images: dict[str, Path]) -> str:
    """A point over ``images`` (disk name -> image file, each sent whole as that disk); its ID."""
    _, client = authenticated_client(paths)
    point_id = str(uuid.uuid4())
    for disk, image in images.items():
        size = image.stat().st_size
        geometry = Geometry(size, CHUNK)
        hashes = [zero_hash(geometry.length(i)) for i in range(geometry.count)]
        stream = Stream(ServerAddress("127.0.0.1", server.process_port), client.context, timeout=30)
        stream.connect(Hello(disk, size, CHUNK))
        fd = os.open(image, os.O_RDONLY)
        try:
            sent = set()
            for start, end in _data_ranges(fd, size):
                for index in range(start // CHUNK, (end - 1) // CHUNK + 1):
                    if index in sent:
                        continue
                    sent.add(index)
                    data = os.pread(fd, geometry.length(index), geometry.offset(index))
                    digest = chunk_hash(data)
                    if digest == hashes[index]:
                        continue  # all zeros: the replica holds it already
                    hashes[index] = digest
                    stream.send(
                        Kind.CHUNK, data, flags=Codec.RAW, offset=geometry.offset(index), size=len(data), digest=digest
                    )
        finally:
            os.close(fd)
        root = RootHasher(geometry)
        root.update(b"".join(hashes))
        close = PointClose(point_id, time.time(), root.hexdigest(), "raw-idle", tuple(images))
        stream.send(Kind.POINT, json.dumps(close.to_json()).encode())
        assert stream.drain(300), f"the process server did not acknowledge {disk}"
        stream.close()
    return point_id
