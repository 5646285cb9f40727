"""A failed-over machine knows it is one (agent/failover.py): the hypervisor's SMBIOS OEM strings or the image's
marker, read as the kernel shows them, recorded at first sight, and what the agent may do with the source's
registration. The daemon's side is in test_daemon.py, the bootstrapper's below, the server's in
tests/server/test_enrolment.py; a booted failover in tests/integration/test_vm_protection.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.bootstrap import BootstrapSettings, bootstrap
from agent.failover import (
    Failover,
    detect,
    load_failover,
    oem_strings,
    parse_signal,
    read_signal,
    speaks_as_source,
)
from agent.paths import Paths
from tests.conftest import DISTROS

POINT = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"
LATER = "6a0c2f9e-8d47-4b1a-9c3e-5f7d1e2a4b60"
# /sys/firmware/dmi/entries/11-0/raw of a lab VM started with -smbios type=11,value=mobility-test-failover:abc
QEMU_ENTRY = b"\x0b\x05\x00\x0e\x01mobility-test-failover:abc\x00\x00"


def entry(paths: Paths, *strings: str, n: int = 0) -> None:
    d = paths.root / f"sys/firmware/dmi/entries/11-{n}"
    d.mkdir(parents=True)
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    (d / "raw").write_bytes(bytes([11, 5, 0, 0x0E, len(strings)]) + body)


def test_oem_strings_as_the_kernel_shows_them() -> None:
    assert oem_strings(QEMU_ENTRY) == ["mobility-test-failover:abc"]
    two = b"\x0b\x05\x00\x0e\x02vendor=x\x00mobility-failover:p\x00\x00"
    assert oem_strings(two) == ["vendor=x", "mobility-failover:p"]
    for bad in (b"", b"\x0b\x05\x00", b"\x01\x05\x00\x0e\x01x\x00\x00", b"\x0b\xff\x00\x0e\x01x\x00\x00"):
        assert oem_strings(bad) == []
    assert oem_strings(b"\x0b\x05\x00\x0e\x01only\x00second\x00\x00") == ["only"]  # the count bounds it


def test_a_signal_names_a_test_or_a_real_failover_of_a_point() -> None:
    assert parse_signal(f"mobility-test-failover:{POINT}", "smbios") is not None
    real = parse_signal(f"  mobility-failover:{POINT}\n", "/etc/mobility/failover")
    assert real is not None and (real.test, real.point_id, real.kind) == (False, POINT, "failover")
    for text in ("mobility-failover:abc", f"mobility-failover:{POINT.upper()}", f"failover:{POINT}", ""):
        assert parse_signal(text, "smbios") is None  # a point ID in canonical form, or no signal at all


def test_the_hypervisor_s_string_comes_before_the_image_s_marker(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert read_signal(paths) is None
    (tmp_path / "etc/mobility").mkdir(parents=True)
    (tmp_path / "etc/mobility/failover").write_text(f"# written by the operator\nmobility-failover:{POINT}\n")
    found = read_signal(paths)
    assert found is not None and (found.test, found.source) == (False, "/etc/mobility/failover")
    entry(paths, "vendor=acme", f"mobility-test-failover:{LATER}")
    found = read_signal(paths)
    assert found is not None and (found.test, found.point_id, found.source) == (True, LATER, "smbios")


def test_detect_records_the_first_sight_and_a_new_point_replaces_it(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert detect(paths, 1.0, "host-1") is None and load_failover(paths) is None
    entry(paths, f"mobility-failover:{POINT}")
    first = detect(paths, 2.0, "host-1")
    assert first == Failover(False, POINT, "host-1", 2.0) == load_failover(paths)
    # The same signal later (registered as host-2 meanwhile): the record, with what it learnt, stays.
    assert detect(paths, 3.0, "host-2") == first
    shutil.rmtree(tmp_path / "sys")
    assert detect(paths, 4.0, "host-2") == first  # the hypervisor no longer says it: still a failover
    # That machine, protected in turn, has a point of its own tested: a test failover of host-2.
    entry(paths, f"mobility-test-failover:{LATER}")
    assert detect(paths, 5.0, "host-2") == Failover(True, LATER, "host-2", 5.0)
    (tmp_path / "var/lib/mobility/failover.json").write_text("{not json")
    assert load_failover(paths) is None  # damaged: the signal decides again


def test_which_registration_a_failover_must_not_use() -> None:
    test, real = Failover(True, POINT, "host-1", 1.0), Failover(False, POINT, "host-1", 1.0)
    assert speaks_as_source(test, "host-1") and speaks_as_source(test, "host-2")
    assert speaks_as_source(real, "host-1") and not speaks_as_source(real, "host-2")
    assert not speaks_as_source(None, "host-1") and not speaks_as_source(real, None)


def test_the_bootstrapper_leaves_a_test_failover_alone(tmp_path: Path) -> None:
    """A test failover's bootstrapper installs, registers and reports nothing (its server is not to hear of it)."""
    shutil.copytree(DISTROS / "debian12", tmp_path, dirs_exist_ok=True)
    paths = Paths(tmp_path)
    entry(paths, f"mobility-test-failover:{POINT}")
    settings = BootstrapSettings(server="127.0.0.1:9", passphrase_file=str(tmp_path / "none"), retry_for=0.1)
    outcome = bootstrap(paths, settings)
    assert (outcome.state, outcome.message) == (
        "test failover",
        f"this machine is a test failover of an unregistered machine at point {POINT}: nothing is installed, "
        "registered or reported",
    )
    assert sorted(p.name for p in (tmp_path / "var/lib/mobility").iterdir()) == ["failover.json"]
