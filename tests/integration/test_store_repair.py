"""`mobility-server store repair` for real: two machines' agents replicate raw loop-device disks to a real server and
cut points; the process server's index is deleted (then, in a second round, damaged) while the agents go on; the
server refuses to start over it, `store repair` rebuilds it, every point of both machines verifies and fails over to
the bytes its disk held, and the running agents converge (a checksum resync against their rebuilt replica) to an
identical replica and new points. On SQLite and, with MOBILITY_TEST_DATABASE=postgresql, PostgreSQL."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.replication_lab import Disk, Lab, Machine, Server, read_disk, stop
from tests.conftest import require_root
from tests.integration.test_replication import database, protect

pytestmark = pytest.mark.integration

MIB = 1 << 20
SIZE = 24 * MIB


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as lab:
        yield lab


def scribble(disk: Disk, rng: random.Random, count: int) -> None:
    """``count`` random MiB-sized writes at random places of the disk (no filesystem: a raw disk)."""
    fd = os.open(disk.loop, os.O_WRONLY)
    try:
        for _ in range(count):
            os.pwrite(fd, rng.randbytes(MIB // 4), rng.randrange(0, SIZE - MIB // 4, 4096))
        os.fsync(fd)
    finally:
        os.close(fd)


def idle_point(lab: Lab, machine: Machine, disk: Disk) -> tuple[dict[str, object], bytes]:
    """A point of the idle disk (raw-idle: its image is the disk), and the disk's bytes."""
    lab.wait_state(machine, disk, "CONTINUOUS", timeout=300)
    time.sleep(1.5)
    point = machine.point()
    assert point["consistency"] == "raw-idle", point
    return point, read_disk(disk.loop, SIZE)


def fails_over_to(server: Server, machine: Machine, point_id: str, disk: Disk, image: bytes, out: Path) -> None:
    server.cli("verify", "--point", point_id)
    server.cli("failover", "--machine", machine.host_id, "--point", point_id, "--out", str(out))
    got = (out / (disk.loop.removeprefix("/dev/") + ".img")).read_bytes()
    assert got == image, f"point {point_id} fails over to other bytes"
    for f in out.iterdir():
        f.unlink()
    out.rmdir()


def test_a_lost_or_damaged_index_is_rebuilt_and_the_agents_converge(lab: Lab) -> None:
    server = lab.server(database=database())
    rng = random.Random(31)  # noqa: S311 - test data
    pairs: list[tuple[Machine, Disk]] = []
    for n in (1, 2):
        disk = lab.disk(f"d{n}", SIZE, ())
        scribble(disk, rng, 40)
        machine = lab.machine(server, f"m{n}")
        lab.expose(machine, disk)
        protect(server, machine, disk)
        lab.start_agent(machine)
        pairs.append((machine, disk))
    images: dict[str, tuple[Machine, Disk, bytes]] = {}
    for loss in ("deleted", "damaged"):
        for _ in range(2):
            for machine, disk in pairs:
                scribble(disk, rng, 6)
                point, image = idle_point(lab, machine, disk)
                images[str(point["point_id"])] = (machine, disk, image)
        for machine, disk in pairs:  # acknowledged after the newest points: in no point, in no record
            scribble(disk, rng, 6)
            lab.wait_state(machine, disk, "CONTINUOUS", timeout=300)
        port = server.process_port
        stop(server.proc)
        index = server.data / "process" / "index.db"
        if loss == "deleted":
            for f in index.parent.glob("index.db*"):
                f.unlink()
            refused = server.cli("serve", "--listen", "127.0.0.1:0", check=False, timeout=120)
            assert refused.returncode == 1 and "error PS-INDEX-MISSING" in refused.stderr, refused.stderr[-2000:]
        else:
            with index.open("r+b") as f:
                for at in range(4096, index.stat().st_size, 4096):
                    f.seek(at)
                    f.write(rng.randbytes(4096))
        repaired = server.cli("store", "repair")
        assert "index rebuilt" in repaired.stdout and "NOT RESTORED" not in repaired.stdout, repaired.stdout
        lab.restart(server, "--process-listen", f"127.0.0.1:{port}")  # where the agents' streams reconnect
        for machine, _ in pairs:
            listed = {str(p["point_id"]) for p in server.json("points", "--machine", machine.host_id)}
            assert listed == {p for p, (m, _, _) in images.items() if m is machine}
        for point_id, (machine, disk, image) in images.items():
            fails_over_to(server, machine, point_id, disk, image, lab.workdir / "fo")
        # The running agents learn that their replica is the newest point and resync against it.
        for machine, disk in pairs:
            lab.wait_state(machine, disk, "CONTINUOUS", timeout=300)
            point, image = idle_point(lab, machine, disk)
            fails_over_to(server, machine, str(point["point_id"]), disk, image, lab.workdir / "fo")
            images[str(point["point_id"])] = (machine, disk, image)
            resyncs = [line for line in machine.log().splitlines() if "(the process server " in line]
            assert len(resyncs) == 1 + (loss == "damaged"), machine.log()[-3000:]
