"""The VM lab itself (scripts/vmlab): what later tests build on. The console driver's results can be trusted, the
guest reaches the host only where it is allowed to, isolated segments are isolated, and nothing outlives its
owner: a killed test's VMs, a killed build's mounts and loop devices."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.polling import wait_for
from scripts.vmlab import DEBIAN11, DEBIAN12, VM, ConsoleTimeout, Disk, Forward, Image, Lab, Spec, VmLabError, image
from scripts.vmlab.host import Undo, loops_below, mounts_below, sweep
from scripts.vmlab.recipe import guest_files
from tests.conftest import REPO, require_root

pytestmark = [pytest.mark.integration]


def test_the_cache_key_covers_the_whole_recipe() -> None:
    """A changed package list, size, mkfs option or guest file is a new image, never the cached one."""
    keys = {
        DEBIAN12.key(),
        DEBIAN11.key(),
        DEBIAN12.with_packages("pg", "postgresql-15").key(),
        dataclasses.replace(DEBIAN12, root_mib=DEBIAN12.root_mib + 4).key(),
        dataclasses.replace(DEBIAN12, xfs_options=("-m", "bigtime=0")).key(),
    }
    assert len(keys) == 5
    assert DEBIAN12.key() == dataclasses.replace(DEBIAN12).key()  # the same recipe, the same image
    assert "/etc/fstab" in guest_files(DEBIAN12, "u") and "vg0-root" in guest_files(DEBIAN12, "u")["/etc/fstab"][1]


def test_a_wait_for_two_slots_keeps_the_one_it_found_and_is_not_starved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab that needs two VM slots at once keeps a free one while it waits for the other: a single VM started
    meanwhile (another test, a test failover) cannot take it, and the wait ends as soon as the other slot frees."""
    from scripts.vmlab import machine

    monkeypatch.setattr(machine, "SLOTS", tmp_path)
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "slot-1.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == b"held\n"
        got: list[int] = []

        def taken() -> bool:
            fd = machine.take_lock(tmp_path / "slot-0.lock", timeout=0)
            if fd is None:
                return True
            os.close(fd)
            return False

        waiter = threading.Thread(target=lambda: got.extend(machine.acquire_slots(2, timeout=60)), daemon=True)
        waiter.start()
        wait_for("the free slot taken", taken)
        for _ in range(10):  # a single VM trying for a second: the slot stays with the wait for two
            assert taken()
            time.sleep(0.1)
        assert waiter.is_alive()
        assert other.stdin is not None
        other.stdin.close()  # the other slot frees
        other.wait(timeout=10)
        waiter.join(timeout=10)
        assert not waiter.is_alive() and len(got) == 2
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    for fd in got:
        os.close(fd)


def test_a_vm_s_extra_disks_oem_strings_and_cpu_reach_qemu(tmp_path: Path) -> None:
    """More disks after the boot disk (a failover's raw images through overlays, blank ones), SMBIOS type 11 strings
    and a CPU model, as QEMU is told them; a string QEMU's option syntax cannot carry is refused, not cut."""
    fake = Image(DEBIAN12, tmp_path / "image")
    extra = Disk(tmp_path / "vdb.img", fake, "raw")
    spec = Spec(oem_strings=("mobility-failover:v1:test:h:p",), blank_disks=(64,), cpu="qemu64,+aes")
    vm = VM("a", Disk.of(fake), tmp_path / "lab", spec, extra=[extra])
    vm.disk = Disk(tmp_path / "lab/a/disk.qcow2", fake)
    vm.extra_disks = [Disk(tmp_path / "lab/a/disk1.qcow2", fake), Disk(tmp_path / "lab/a/blank2.qcow2", fake, "qcow2")]
    argv = vm._argv()
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0:3] for d in drives] == [
        [f"file={tmp_path}/lab/a/disk.qcow2", "if=none", "id=disk0"],
        [f"file={tmp_path}/lab/a/disk1.qcow2", "if=none", "id=disk1"],
        [f"file={tmp_path}/lab/a/blank2.qcow2", "if=none", "id=disk2"],
    ]
    assert "virtio-blk-pci,drive=disk2" in argv and "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert argv[argv.index("-smbios") + 1] == "type=11,value=mobility-failover:v1:test:h:p"
    assert argv[argv.index("-cpu") + 1] == "qemu64,+aes"
    assert extra.format == "raw" and Disk(tmp_path / "x.qcow2", fake).format == "qcow2"
    bad = VM("b", Disk.of(fake), tmp_path / "lab", Spec(oem_strings=("a,b",)))
    bad.disk = vm.disk
    with pytest.raises(VmLabError, match="an SMBIOS string QEMU cannot carry"):
        bad._argv()


def test_sweep_undoes_what_a_killed_build_left(tmp_path: Path) -> None:
    """A build killed outright leaves loop devices and mounts below its directory; the next one finds them there."""
    require_root()
    build = (tmp_path / "debian12-x.build").resolve()
    build.mkdir()
    disk = build / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    undo = Undo()
    device = undo.loop(disk, offset=1 << 20, size=32 << 20)
    subprocess.run(["mkfs.ext4", "-q", device], check=True, timeout=60)
    undo.mount([device], build / "mnt")
    undo.mount(["-t", "tmpfs", "tmpfs"], build / "mnt/inner")
    del undo  # the builder is gone: nothing undoes these but the sweep
    assert mounts_below(build) == [build / "mnt/inner", build / "mnt"] and loops_below(build) == [device]
    done = sweep(build)
    assert done == [f"mount {build / 'mnt/inner'}", f"mount {build / 'mnt'}", f"loop device {device}"]
    assert mounts_below(build) == [] and loops_below(build) == []


class Reply(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.server.reply)  # type: ignore[attr-defined]


@pytest.fixture
def host_servers() -> Iterator[tuple[int, int]]:
    """Two TCP servers on the host's loopback: the one a guest is given, and one it is not."""
    servers = []
    for reply in (b"allowed\n", b"private\n"):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Reply)
        server.reply = reply  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield servers[0].server_address[1], servers[1].server_address[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.mark.vm
def test_console_ssh_and_networks(tmp_path: Path, host_servers: tuple[int, int]) -> None:
    require_root()
    allowed, private = host_servers
    with Lab(tmp_path / "lab") as lab:
        segment = lab.segment()
        a = lab.vm("a", image(DEBIAN12), Spec(hostname="a", forwards=[Forward(allowed, 8080)], segments=[segment]))
        b = lab.vm("b", image(DEBIAN11), Spec(hostname="b", user_net=False, segments=[segment]))
        lab.start(a, b)
        a.wait_booted()
        b.wait_booted()

        # The console: exit code and both streams; output that imitates the driver's own markers is just output; a
        # command longer than a terminal line; a command past its timeout is interrupted and the shell goes on.
        r = a.run("echo out; echo err >&2; exit 3")
        assert (r.code, r.output) == (3, "out\nerr\n")
        r = a.run("printf '\\036END 0000 0\\n'; echo after")
        assert (r.code, r.output) == (0, "\x1eEND 0000 0\nafter\n")
        assert a.run("echo " + "x" * 9000).output == "x" * 9000 + "\n"
        with pytest.raises(ConsoleTimeout) as timed_out:
            a.run("echo started; sleep 120", timeout=5)
        assert "started" in timed_out.value.output
        assert a.run("hostname").output == "a\n"

        # SSH: binary data in, the same data in the guest.
        data = os.urandom(300_000)
        local = tmp_path / "blob"
        local.write_bytes(data)
        a.put(local, "/root/blob")
        assert a.run("sha256sum /root/blob").output.split()[0] == hashlib.sha256(data).hexdigest()

        # The host only where it is forwarded: the allowed server at 10.0.2.100, not the private one at 10.0.2.2.
        assert a.run("timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.100/8080; cat <&3'").output == "allowed\n"
        refused = a.run(f"timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{private}; cat <&3'")
        assert refused.code != 0 and "private" not in refused.output

        # The segment: b reaches a's SSH server on it, and nothing beyond it.
        a.run("ip addr add 192.168.77.1/24 dev ens5 && ip link set ens5 up").check()
        b.run("ip addr add 192.168.77.2/24 dev ens4 && ip link set ens4 up").check()
        banner = b.run("timeout 20 bash -c 'until exec 3<>/dev/tcp/192.168.77.1/22; do sleep 1; done; head -c 8 <&3'")
        assert banner.output.startswith("SSH-2.0"), banner.output
        assert "unreachable" in b.run("ip route get 10.0.2.2").output
        b.poweroff()
        a.poweroff()


@pytest.mark.vm
def test_a_killed_owner_takes_its_vms_with_it(tmp_path: Path) -> None:
    """kill -9 of the process that started a VM (a test killed outright) leaves no QEMU behind."""
    require_root()
    image(DEBIAN12)  # built (or found) here, not in the child about to be killed
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from scripts.vmlab import DEBIAN12, Lab, image\n"
            "lab = Lab(Path(sys.argv[1])); vm = lab.vm('doomed', image(DEBIAN12)); lab.start(vm)\n"
            "print(vm.proc.pid, flush=True); time.sleep(600)\n",
            str(tmp_path / "lab"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        line = owner.stdout.readline() if owner.stdout else ""
        qemu = int(line)
        assert Path(f"/proc/{qemu}/cmdline").read_bytes().startswith(b"qemu-system-x86_64\0")
    finally:
        owner.kill()
        owner.wait(timeout=30)
    wait_for(f"QEMU {qemu} to end with its owner", lambda: not alive(qemu), timeout=30)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
