"""What the agent reports about the machine it runs on (the facts its identity is checked against at every boot)."""

from __future__ import annotations

from pathlib import Path

from agent.identity import collect_facts
from agent.paths import Paths


def _iface(root: Path, name: str, mac: str, *, hardware: bool) -> None:
    iface = root / "sys/class/net" / name
    iface.mkdir(parents=True)
    (iface / "address").write_text(mac + "\n")
    if hardware:  # sysfs links a NIC to its device (PCI, virtio, ...); a veth, bridge or tunnel has none
        (root / "sys/devices" / name).mkdir(parents=True)
        (iface / "device").symlink_to(root / "sys/devices" / name)


def test_facts_count_network_hardware_only(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("ab" * 16 + "\n")
    _iface(tmp_path, "eth0", "52:54:00:AA:BB:01", hardware=True)
    _iface(tmp_path, "lo", "00:00:00:00:00:00", hardware=False)
    before = collect_facts(Paths(tmp_path))
    assert (before.machine_id, before.macs) == ("ab" * 16, ("52:54:00:aa:bb:01",))
    # A container started, a bridge made: the same machine.
    _iface(tmp_path, "veth1a2b3c", "02:42:ac:11:00:02", hardware=False)
    _iface(tmp_path, "docker0", "02:42:5e:00:00:01", hardware=False)
    assert collect_facts(Paths(tmp_path)) == before
    # A second NIC is hardware: it counts.
    _iface(tmp_path, "eth1", "52:54:00:aa:bb:02", hardware=True)
    assert collect_facts(Paths(tmp_path)).macs == ("52:54:00:aa:bb:01", "52:54:00:aa:bb:02")
