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


def test_every_number_on_the_wire_is_bounded_where_it_is_parsed() -> None:
    """The values that got through before: a sequence of 2^63 (SQLite holds 2^63 - 1), a point `created` of 1e300
    and a heartbeat's `last_point` of 1e300 (a listing turned them into dates and crashed)."""
    from agent.shared.replication_wire import LATEST, MAX_SEQ, DiskReport

    for seq, offset in ((1 << 63, 0), (MAX_SEQ + 1, 0), (1, (1 << 56) + 65536), ((1 << 64) - 1, (1 << 64) - 1)):
        with pytest.raises(ProtocolError, match="beyond"):
            Header.unpack(Header(Kind.CHUNK, Codec.RAW, 4096, seq, offset, 4096).pack())
    assert Header.unpack(Header(Kind.CHUNK, Codec.RAW, 4096, MAX_SEQ, 1 << 56, 4096).pack()).seq == MAX_SEQ
    with pytest.raises(ProtocolError, match="more than a chunk"):
        Header.unpack(Header(Kind.ACK, 0, 0, 1, 0, (1 << 32) - 1).pack())
    point = {
        "point_id": "11111111-1111-4111-8111-111111111111",
        "created": 1.7e9,
        "root": "a" * 64,
        "consistency": "crash-consistent",
        "disks": ["/dev/sdb"],
        "freeze_ms": 250.0,
    }
    assert PointClose.from_json(point).created == 1.7e9
    for field, value in (("created", 1e300), ("created", -1.0), ("created", LATEST + 1), ("freeze_ms", 1e300)):
        with pytest.raises(ProtocolError, match=field):
            PointClose.from_json({**point, field: value})
    disk = {"disk": "/dev/sdb", "state": "CONTINUOUS", "throughput_bps": 0.0}
    for bad in (
        {"last_point": 1e300},
        {"freeze_ms": 1e300},
        {"disks": [{**disk, "last_point": 1e300}]},
        {"disks": [{**disk, "lag_seconds": -1}]},
        {"disks": [{**disk, "eta_seconds": 1e300}]},
        {"disks": [{**disk, "throughput_bps": 1e300}]},
    ):
        with pytest.raises(WireError):
            ReplicationReport.from_json(bad)
    # What an agent measured goes out inside those bounds, so a strange measurement never gets its heartbeat refused.
    sent = ReplicationReport(
        (DiskReport("/dev/sdb", "CONTINUOUS", 0, 1 << 40, 1e300, float("inf"), 1e300, 1e300),), 1e300, None, 0, 1e9
    ).to_json()
    parsed = ReplicationReport.from_json(json.loads(json.dumps(sent)))
    assert parsed.last_point == LATEST and parsed.freeze_ms == 3_600_000.0
    assert (parsed.disks[0].lag_seconds, parsed.disks[0].throughput_bps, parsed.disks[0].last_point) == (
        float(1 << 32),
        0.0,
        LATEST,
    )


def test_the_next_point_is_reported_within_bounds_and_shown_with_why_it_waits() -> None:
    from agent.replication.local_commands import status_lines
    from agent.shared.replication_wire import NextPoint

    plan = NextPoint(12300.0, 20e6, 15e6, "expected freeze 12.3 s, more than 5 s: the writes change 20.0 MB/s")
    doc = ReplicationReport(next_point=plan).to_json()
    assert ReplicationReport.from_json(json.loads(json.dumps(doc))).next_point == plan
    assert NextPoint(1e300, 1e300, -5.0).to_json()["expected_freeze_ms"] == 3_600_000.0  # bounded by the sender
    bad = {**doc, "next_point": {**doc["next_point"], "send_bps": 1e300}}
    with pytest.raises(WireError, match="send_bps"):
        ReplicationReport.from_json(bad)
    lines = status_lines({**doc, "disks": [{"disk": "/dev/sdb", "state": "CONTINUOUS"}]})
    assert any(
        "next point: expected freeze 12300 ms" in line and "POSTPONED: expected freeze 12.3 s" in line for line in lines
    )


def test_a_point_of_several_disks_is_as_consistent_as_its_weakest() -> None:
    from agent.shared.replication_wire import weakest_consistency

    assert weakest_consistency(["app-consistent", "crash-consistent"]) == "crash-consistent"
    assert weakest_consistency(["crash-consistent", "raw-idle", "app-consistent"]) == "raw-idle"
    assert weakest_consistency(["raw-idle", "raw-busy"]) == "raw-busy"
    assert weakest_consistency(["app-consistent", "from-a-newer-agent"]) == "from-a-newer-agent"  # unknown: weakest
