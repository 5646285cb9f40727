"""agent/shared/replication_wire.py: frames and messages are checked once, at the edge."""

from __future__ import annotations

import json

import pytest

from agent.replication.chunks import Geometry, RootHasher, chunk_hash, geometry_for, is_zero, zero_hash
from agent.shared.replication_wire import (
    HEADER,
    Codec,
    Header,
    Hello,
    Kind,
    PointClose,
    Protection,
    ProtocolError,
    ReplicationReport,
    frame,
)
from agent.shared.wire import WireError


def test_headers_round_trip_and_bad_ones_are_refused() -> None:
    h = Header(Kind.CHUNK, Codec.ZSTD, 100, 7, 65536, 65536, b"h" * 32)
    assert Header.unpack(h.pack()) == h
    with pytest.raises(ProtocolError, match="magic"):
        Header.unpack(b"XX" + h.pack()[2:])
    with pytest.raises(ProtocolError, match="larger"):
        Header.unpack(Header(Kind.HELLO, 0, 1 << 20).pack())
    with pytest.raises(ProtocolError, match="no payload"):
        Header.unpack(Header(Kind.CHUNK, Codec.ZERO, 10, 1, 0, 4096).pack())
    with pytest.raises(ProtocolError, match="raw chunk"):
        Header.unpack(Header(Kind.CHUNK, Codec.RAW, 10, 1, 0, 4096).pack())
    with pytest.raises(ProtocolError, match="kind"):
        Header.unpack(HEADER.pack(b"MR", 99, 0, 0, 0, 0, 0, bytes(32)))
    assert len(frame(Kind.ACK, seq=3)) == HEADER.size


@pytest.mark.parametrize(
    "disk",
    ["/dev/../etc/passwd", "/etc/passwd", "/dev/sd b", "/dev/sdb\n", "/dev//sdb", "dev/sdb", "/dev/" + "a" * 200],
)
def test_disk_names_must_be_plain_dev_paths(disk: str) -> None:
    with pytest.raises(ProtocolError):
        Hello.from_json({"disk": disk, "size": 4096, "chunk_size": 4096})


def test_messages_are_typed_and_bounded() -> None:
    ok = {"disk": "/dev/disk/by-id/ata-X_1", "size": 10, "chunk_size": 65536, "version": 1}
    assert Hello.from_json(ok).disk.endswith("X_1")
    for bad in (
        {"disk": "/dev/sdb", "size": -1, "chunk_size": 65536},
        {"disk": "/dev/sdb", "size": True, "chunk_size": 65536},
        {"disk": "/dev/sdb", "size": 1, "chunk_size": 1 << 30},
        [],
        "x",
    ):
        with pytest.raises(ProtocolError):
            Hello.from_json(bad)
    point = {
        "point_id": "not-a-uuid",
        "created": 1.0,
        "root": "a" * 64,
        "consistency": "crash-consistent",
        "disks": ["/dev/sdb"],
    }
    with pytest.raises(ProtocolError, match="UUID"):
        PointClose.from_json(point)
    with pytest.raises(ProtocolError):
        PointClose.from_json({**point, "point_id": "11111111-1111-4111-8111-111111111111", "consistency": "best"})
    with pytest.raises(WireError):
        Protection.from_json(
            {
                "disks": [],
                "policy": {"name": "p", "rpo_seconds": 0, "interval_seconds": 300, "bandwidth_bps": 0, "retention": 1},
                "process": {"host": None, "port": 9444},
            }
        )
    with pytest.raises(WireError):
        ReplicationReport.from_json({"disks": [{"disk": "/dev/sdb", "state": "FINE", "throughput_bps": 0}]})
    report = {
        "disks": [
            {"disk": "/dev/sdb", "state": "STALLED", "throughput_bps": 0.0, "error": "PS-STORE-FULL", "detail": "full"}
        ]
    }
    assert ReplicationReport.from_json(json.loads(json.dumps(report))).disks[0].error == "PS-STORE-FULL"


def test_geometry_and_root_hash() -> None:
    g = geometry_for(3 * 65536 + 512)
    assert (g.count, g.length(3), list(g.chunks_of(65535, 2))) == (4, 512, [0, 1])
    assert geometry_for(1 << 40).chunk_size == 1 << 20  # 1 TiB: 1 Mi chunks of 1 MiB
    assert is_zero(bytes(65536)) and not is_zero(b"\0" * 100 + b"\1")
    assert zero_hash(512) == chunk_hash(bytes(512))
    r = RootHasher(Geometry(512, 512))
    with pytest.raises(ValueError, match="chunk hashes"):
        r.hexdigest()
    r.update(zero_hash(512))
    assert len(r.hexdigest()) == 64
