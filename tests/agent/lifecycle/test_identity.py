"""What the agent reports about the machine it runs on (the facts its identity is checked against at every boot)."""

from __future__ import annotations

from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.identity import collect_facts


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


def test_an_enrolment_without_an_answer_keeps_its_key_for_the_retry(tmp_path: Path) -> None:
    """The key is kept (0600) before its CSR could leave, and the next enrolment of the same machine uses it again;
    other facts (an image copied mid-enrolment) get a new key, and so does a damaged file; once the answer is
    stored the kept key is gone, and template-prep removes it with the rest of the identity."""
    from agent.lifecycle.identity import enrolment_answered, enrolment_key, key_pem
    from agent.lifecycle.template import template_prep
    from agent.shared.wire import MachineFacts

    paths = Paths(tmp_path)
    facts = MachineFacts("ab" * 16, "", ("52:54:00:aa:bb:01",))
    key = enrolment_key(paths, facts)
    assert paths.pending_enrolment.stat().st_mode & 0o777 == 0o600
    assert key_pem(enrolment_key(paths, facts)) == key_pem(key)
    other = enrolment_key(paths, MachineFacts("cd" * 16, "", ("52:54:00:aa:bb:01",)))
    assert key_pem(other) != key_pem(key)
    assert key_pem(enrolment_key(paths, MachineFacts("cd" * 16, "", ("52:54:00:aa:bb:01",)))) == key_pem(other)
    paths.pending_enrolment.write_text("{not json")
    assert key_pem(enrolment_key(paths, facts)) not in (key_pem(key), key_pem(other))
    enrolment_answered(paths)
    assert not paths.pending_enrolment.exists()
    enrolment_key(paths, facts)
    assert "/var/lib/mobility/pending-enrolment.json" in template_prep(paths).removed
    assert not paths.pending_enrolment.exists()
