"""What every VM of the server shares: a program tied to its command dies with it (a real kill -9 here), the
machine's VM slots, a booted point's QEMU line (no network, the mark, raw disks), guestfish's quoting, and scratch
areas swept once their owner is gone (tests/integration/test_vm_failover.py kills a real test failover)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.errors import FailoverVmBusy
from server.process import recovery_vm, scratch
from server.process.appliance import quote
from server.process.recovery_vm import BootSpec, BootVM, take_slot, tied_to_this_process

CHILD = """
import subprocess, sys, time
from server.process.recovery_vm import tied_to_this_process
p = subprocess.Popen(tied_to_this_process(["sleep", "300"]))
print(p.pid, flush=True)
time.sleep(300)
"""


def test_a_program_tied_to_its_command_dies_when_the_command_is_killed() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[3]
    )
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        deadline = time.monotonic() + 10
        while psutil.Process(pid).name() != "sleep":  # exec'd past setpriv and the check
            assert time.monotonic() < deadline
            time.sleep(0.05)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the tied program outlived its command"
            time.sleep(0.05)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_a_tied_program_whose_command_is_already_gone_never_runs(tmp_path: Path) -> None:
    argv = tied_to_this_process(["touch", str(tmp_path / "ran")])
    argv[argv.index(str(os.getpid()))] = "1"  # as if its parent had died before the signal was set
    r = subprocess.run(argv, check=False, timeout=30)
    assert r.returncode == 111 and not (tmp_path / "ran").exists()
    r = subprocess.run(tied_to_this_process(["touch", str(tmp_path / "ran")]), check=False, timeout=30)
    assert r.returncode == 0 and (tmp_path / "ran").exists()


def test_vm_slots_are_machine_wide_and_a_run_waits_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery_vm, "SLOTS", tmp_path / "slots")
    held = [take_slot(1), take_slot(1)]
    started = time.monotonic()
    with pytest.raises(FailoverVmBusy):
        take_slot(1.5)
    assert 1.5 <= time.monotonic() - started < 10
    os.close(held.pop())
    held.append(take_slot(1))  # a slot given back is taken again
    # The lock is the machine's: another process sees the slots taken.
    probe = f"import fcntl, os; fd = os.open({str(tmp_path / 'slots' / 'slot-0.lock')!r}, os.O_RDWR)\n"
    probe += "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False, timeout=30)
    assert r.returncode != 0 and b"BlockingIOError" in r.stderr
    for fd in held:
        os.close(fd)


def test_a_booted_point_has_no_network_raw_disks_and_the_mark(tmp_path: Path) -> None:
    disks = (tmp_path / "a.img", tmp_path / "odd,name.img")
    argv = BootVM(tmp_path, BootSpec(disks, oem_strings=("mobility-failover:v1:test:H:P",), accel="tcg")).argv()
    line = " ".join(argv)
    assert "-netdev" not in argv and "user" not in argv and argv[argv.index("-nic") + 1] == "none"
    assert "-nodefaults" in argv and "-no-reboot" in argv and "pc,accel=tcg" in argv
    assert f"file={disks[0]},if=none,id=disk0,format=raw" in line
    assert "file=" + str(disks[1]).replace(",", ",,") + ",if=none,id=disk1,format=raw" in line
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in line and "virtio-blk-pci,drive=disk1,bootindex=1" in line
    assert argv[argv.index("-smbios") + 1] == "type=11,value=mobility-failover:v1:test:H:P"
    assert line.count("-serial") == 2  # the console, and the report line
    sata = " ".join(BootVM(tmp_path, BootSpec(disks, bus="sata", accel="tcg")).argv())
    assert "ahci,id=ahci0" in sata and "ide-hd,drive=disk1,bus=ahci0.1,bootindex=1" in sata
    scsi = " ".join(BootVM(tmp_path, BootSpec(disks, bus="scsi", accel="tcg")).argv())
    assert "virtio-scsi-pci" in scsi and "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0" in scsi


def test_guestfish_words_are_quoted_so_that_a_name_stays_one_word() -> None:
    assert quote("/dev/vg0/root") == "/dev/vg0/root"
    assert quote("rw,nouuid") == "rw,nouuid"
    assert quote('a b"c\\d') == '"a b\\"c\\\\d"'
    assert quote("x\ny") == '"x\\x0ay"' and quote("!reboot") == '"!reboot"'
    with pytest.raises(ValueError):
        quote("\u2603")


def _hold(path: Path) -> subprocess.Popen[bytes]:
    """Another process holding an area's lock, as a running test failover (or its kept VM) does."""
    code = f"import fcntl, os, time; fd = os.open({str(path)!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
    code += "print('held', flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


def test_the_sweep_removes_the_areas_of_dead_runs_only(tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    with scratch.area(root, "p1") as live:
        (live.path / "images").mkdir()
        # A run killed outright: its area is there, its lock free.
        dead = root / "0000aaaa-1111-2222-3333-444455556666-0123abcd"
        dead.mkdir()
        (dead / scratch.LOCK).touch()
        (dead / "disk.img").write_bytes(b"x")
        # A run still going in another process; a kept area; something of someone else's.
        alive = root / "0000aaaa-1111-2222-3333-444455556666-89abcdef"
        alive.mkdir()
        (alive / scratch.LOCK).touch()
        holder = _hold(alive / scratch.LOCK)
        kept = root / "0000aaaa-1111-2222-3333-444455556666-00000000"
        kept.mkdir()
        (kept / scratch.KEPT).touch()
        other = root / "notes"
        other.mkdir()
        try:
            assert scratch.sweep(root) == [dead]
            assert live.path.exists() and alive.exists() and kept.exists() and other.exists()
            holder.kill()
            holder.wait()
            assert scratch.sweep(root) == [alive]
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        # The area's own lock is ours while it lives.
        fd = os.open(live.path / scratch.LOCK, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not live.path.exists() and kept.exists()


def test_the_process_servers_maintenance_sweeps_a_killed_runs_area_without_waiting_for_another_run(
    tmp_path: Path,
) -> None:
    """A test failover killed with kill -9 leaves full copies of the point's disks in its area: the running process
    server removes them within its sweep interval (and at its start), not only the next test failover."""
    from server.process.maintenance import Maintenance
    from server.process.store import ChunkStore

    root = tmp_path / "scratch"
    root.mkdir()
    dead = root / "0000aaaa-1111-2222-3333-444455556666-0123abcd"  # there before the server started
    dead.mkdir()
    (dead / scratch.LOCK).touch()
    (dead / "disk.img").write_bytes(b"x" * 4096)
    running = root / "0000aaaa-1111-2222-3333-444455556666-89abcdef"  # a run going on, killed later
    running.mkdir()
    (running / scratch.LOCK).touch()
    holder = _hold(running / scratch.LOCK)
    store = ChunkStore(tmp_path / "process", writer=True, reserve=0)
    maintenance = Maintenance(store, lambda host: None, scratch=root, sweep_every=0.2)
    maintenance.start()
    try:
        deadline = time.monotonic() + 30
        while dead.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dead.exists()
        time.sleep(0.6)  # three sweeps' time: the running one's lock is held, so it stays
        assert running.exists()
        holder.kill()
        holder.wait()
        while running.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running.exists() and root.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        maintenance.stop()
        store.close()
    assert not maintenance.is_alive()
