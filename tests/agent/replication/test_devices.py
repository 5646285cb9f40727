"""agent/replication/devices.py and tracing.py against the real kernel (root): what cannot be protected or traced
is refused with its error ID."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.errors import DiskUnsupported, TracingUnavailable
from agent.host.paths import Paths
from agent.replication.devices import resolve_disk
from agent.replication.tracing import Tracer
from scripts.replication_lab import Lab
from tests.conftest import require_root

pytestmark = pytest.mark.integration


def test_a_partition_is_refused_its_disk_is_taken(tmp_path: Path) -> None:
    require_root()
    with Lab(tmp_path / "lab") as lab:
        disk = lab.disk("d", 8 << 20, ("ext4",), partitioned=True)
        root = tmp_path / "root"
        (root / "dev").mkdir(parents=True)
        part = Path(disk.partitions[0])
        node = root / "dev" / f"{Path(disk.loop).name}p1"
        os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(part).st_rdev)
        os.mknod(root / disk.loop.lstrip("/"), 0o600 | stat.S_IFBLK, os.makedev(disk.major, disk.minor))
        with pytest.raises(DiskUnsupported):
            resolve_disk(Paths(root), f"/dev/{node.name}")
        assert resolve_disk(Paths(root), disk.loop).major == disk.major


def test_a_tracing_instance_that_cannot_be_made_is_refused() -> None:
    require_root()
    with pytest.raises(TracingUnavailable):
        Tracer("mobility-test/no-such-parent", 4, lambda n: None)
