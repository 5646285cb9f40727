"""Mobility in the lab: a configuration server on the host that guests reach only through `guestfwd`, templates
made in a running VM the way docs/templates.md tells operators to, and what a guest's agent says about itself.

    server = LabServer.start(tmp / "data", bundles)
    made = make_template(lab, image(DEBIAN12), server, dist, keep_unprepped=True)
    clone = lab.vm("a", made.prepped.disk, server.spec(hostname="clone-a"))
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scripts.localserver import init_local_server, process_port, start_local_server
from scripts.vmlab.build import Image
from scripts.vmlab.host import VmLabError
from scripts.vmlab.lab import Lab
from scripts.vmlab.machine import VM, Disk, Forward, Hardware, Spec
from scripts.vmlab.recipe import GUEST_ADDRESS_OF_HOST

if TYPE_CHECKING:
    from server.database.machines import Machine
    from server.database.protection import ProtectionRow
    from server.database.storage import Storage

REPO = Path(__file__).resolve().parent.parent.parent
GUEST_API_PORT = 9443  # the server as guests reach it: GUEST_ADDRESS_OF_HOST:9443 (and its process server at :9444)
GUEST_PROCESS_PORT = 9444
MOBILITY = "/usr/local/mobility/current/mobility/mobility"  # the installed agent's command
TOKEN_FILE = "/etc/mobility/token"  # noqa: S105 - where the secret goes, not one
TEMPLATE_UNITS = ("mobility-bootstrap.service", "mobility-bootstrap.timer")


@dataclass
class LabServer:
    """`mobility-server serve` on 127.0.0.1 whose certificate also names the address guests reach it at."""

    data: Path
    proc: subprocess.Popen[str]
    port: int
    fingerprint: str
    _storage: Storage | None = None

    @staticmethod
    def start(
        data: Path, bundles: Sequence[Path] = (), heartbeat_interval: float = 10.0, database: str | None = None
    ) -> LabServer:
        """Initialise ``data`` (if new) for guests and the host, publish ``bundles``, serve on a free port."""
        if not (data / ".initialised").exists():
            init_local_server(data, GUEST_ADDRESS_OF_HOST, database, also=("127.0.0.1",))
        proc, address, fingerprint = start_local_server(
            data,
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--process-address",
            f"{GUEST_ADDRESS_OF_HOST}:{GUEST_PROCESS_PORT}",
        )
        server = LabServer(data, proc, int(address.rsplit(":", 1)[1]), fingerprint)
        try:
            if bundles:
                server.cli("repo", "add", *map(str, bundles))
        except BaseException:
            server.stop()
            raise
        return server

    @property
    def guest_address(self) -> str:
        return f"{GUEST_ADDRESS_OF_HOST}:{GUEST_API_PORT}"

    def forwards(self) -> list[Forward]:
        """What a guest may reach of the host: this server's API and its process server, nothing else."""
        forwards = [Forward(self.port, GUEST_API_PORT)]
        replication = process_port(self.data)
        if replication is not None:
            forwards.append(Forward(replication, GUEST_PROCESS_PORT))
        return forwards

    def spec(self, **settings: Any) -> Spec:
        """A VM spec whose guest reaches this server (and nothing else)."""
        return Spec(forwards=self.forwards(), **settings)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "server", *args, "--data", str(self.data)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
        if check and r.returncode:
            raise VmLabError(f"mobility-server {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r

    def token(self, ttl: str = "1d", uses: int | None = None) -> str:
        """A new enrolment token (`mobility-server token create`): the template-safe secret."""
        return self.cli("token", "create", "--ttl", ttl, *(["--uses", str(uses)] if uses else [])).stdout.strip()

    def machines(self) -> list[dict[str, Any]]:
        """`mobility-server machines --json`: what an operator sees."""
        return list(json.loads(self.cli("machines", "--json").stdout))

    def poll(self) -> list[Machine]:
        """The machines as the database has them now, read in this process: for waiting loops, which would otherwise
        start a command (a third of a CPU second) every few seconds beside VMs that need the CPU."""
        return self.storage().machines()

    def storage(self) -> Storage:
        """The server's database, opened in this process (closed by `stop`)."""
        if self._storage is None:
            from server.database.connection import database_for
            from server.database.storage import Storage
            from server.datadir import DataDir

            self._storage = Storage.open(database_for(DataDir(self.data), None), pool_size=0)
        return self._storage

    def machine(self, host_id: str) -> dict[str, Any] | None:
        return next((m for m in self.machines() if m["host_id"] == host_id), None)

    def jobs(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("jobs", "--json").stdout))

    def protection(self, host_id: str) -> ProtectionRow | None:
        """The machine's protection and the replication status it last reported, read in this process."""
        return self.storage().protection(host_id)

    def wait_continuous(self, host_id: str, disks: int, timeout: float = 1800.0) -> ProtectionRow:
        """Until the machine reports ``disks`` protected disks, all CONTINUOUS (its initial sync done)."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.protection(host_id)
            report = row.report if row is not None else None
            if (
                row is not None
                and report is not None
                and len(report.disks) == disks
                and {d.state for d in report.disks} == {"CONTINUOUS"}
            ):
                return row
            if time.monotonic() >= deadline:
                raise VmLabError(f"{host_id} not CONTINUOUS within {timeout:g} s: {report}")
            time.sleep(2.0)

    def fail_over(self, host_id: str, point: str, out: Path) -> dict[str, Any]:
        """`mobility-server failover --machine H --point P --out DIR`: what it says (point.json: each disk and its
        image, in the point's order)."""
        argv = ["failover", "--machine", host_id, "--point", point, "--out", str(out), "--json"]
        r = subprocess.run(
            [sys.executable, "-m", "server", *argv, "--data", str(self.data)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=1800,
            check=False,
        )
        if r.returncode:
            raise VmLabError(f"failover of {point} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return dict(json.loads(r.stdout))

    def stop(self) -> int:
        if self._storage is not None:
            self._storage.close()
            self._storage = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def install_bootstrapper(vm: VM, dist: Path, server: LabServer, token: str, retry_for: float | None = None) -> None:
    """docs/templates.md, "Bake the bootstrapper in": the program and its units from the build's output, the
    server's address and pinned fingerprint, the enrolment token (over stdin: a secret never rides on a command
    line), the units enabled. Over SSH."""
    vm.put(dist / "mobility-bootstrap", "/usr/local/sbin/mobility-bootstrap", 0o755)
    for unit in TEMPLATE_UNITS:
        vm.put(dist / unit, f"/etc/systemd/system/{unit}")
    secret = vm.ssh(f"umask 077 && mkdir -p /etc/mobility && cat > {TOKEN_FILE}", stdin=token.encode() + b"\n")
    if secret.returncode:
        raise VmLabError(f"{vm.name}: writing the token failed: {secret.stderr.strip()}")
    conf = f"server = {server.guest_address}\nfingerprint = {server.fingerprint}\npassphrase_file = {TOKEN_FILE}\n" + (
        f"retry_for = {retry_for:g}\n" if retry_for is not None else ""
    )
    r = vm.ssh(
        f"cat > /etc/mobility/bootstrap.conf && systemctl daemon-reload && systemctl enable {' '.join(TEMPLATE_UNITS)}",
        stdin=conf.encode(),
    )
    if r.returncode:
        raise VmLabError(f"{vm.name}: enabling the bootstrapper failed: {r.stderr.strip()}")


def agent_status(vm: VM) -> dict[str, Any]:
    """`mobility status --json` in the guest ({} before the agent is installed)."""
    r = vm.ssh(f"test -x {MOBILITY} && {MOBILITY} status --json")
    if r.returncode or not r.stdout.strip().startswith("{"):
        return {}
    return dict(json.loads(r.stdout))


def guest_facts(vm: VM) -> dict[str, str]:
    """What tells this machine from its copies: machine-id, DMI product UUID, host name."""
    out = vm.run("cat /etc/machine-id /sys/class/dmi/id/product_uuid; hostname").check("reading the facts")
    machine_id, product_uuid, hostname = out.split()
    return {"machine_id": machine_id, "product_uuid": product_uuid, "hostname": hostname}


def wait_registered(
    server: LabServer, host_ids_before: set[str], hostname: str, timeout: float = 600.0
) -> dict[str, Any]:
    """The machine named ``hostname`` that is new to the server since ``host_ids_before``, once it is online and
    healthy (its daemon's first heartbeats arrived)."""
    deadline = time.monotonic() + timeout
    while True:
        for m in server.poll():
            new = m.host_id not in host_ids_before and m.hostname == hostname
            if new and m.online(time.time()) and m.health is not None and m.health.status == "healthy":
                found = server.machine(m.host_id)
                if found is not None:
                    return found
        if time.monotonic() >= deadline:
            raise VmLabError(f"{hostname} did not register healthy within {timeout:g} s: {server.machines()}")
        time.sleep(1.0)


@dataclass(frozen=True)
class Template:
    """A template disk (its clones overlay it) and what the VM it was made in was: the identity it registered as
    (None when it never registered), its machine-id and its hardware."""

    disk: Disk
    prepped: bool
    host_id: str | None
    machine_id: str
    hardware: Hardware


@dataclass(frozen=True)
class Templates:
    prepped: Template
    unprepped: Template | None  # the same machine before `template-prep`, when asked for
    seconds: dict[str, float]  # how long each step took
    prep: dict[str, Any]  # what `template-prep --json` said (empty when the template never registered)


def make_template(
    lab: Lab,
    base: Image | Disk,
    server: LabServer,
    dist: Path,
    *,
    name: str = "template",
    register: bool = True,
    keep_unprepped: bool = False,
    token_uses: int | None = None,
) -> Templates:
    """docs/templates.md in a VM: boot ``base`` and bake the bootstrapper in. With ``register`` (the usual way, which
    also proves the set-up), let it install and register this machine (the template's own identity) and shut down;
    with ``keep_unprepped`` that disk is kept as an unprepped template; then boot the same machine again, run
    `mobility template-prep` and shut down. Without ``register``, the bootstrapper never runs in the template: the
    machine-id is cleared by hand as the page says, and one boot does."""
    seconds: dict[str, float] = {}
    hardware = Hardware.new()
    vm = lab.vm(name, base, server.spec(hardware=hardware, hostname=name))
    t = time.monotonic()
    lab.start(vm)
    vm.wait_booted()
    seconds["boot"] = time.monotonic() - t
    machine_id = guest_facts(vm)["machine_id"]
    install_bootstrapper(vm, dist, server, server.token(uses=token_uses))
    if not register:
        vm.run(CLEAR_MACHINE_ID).check("clearing the machine-id")
        vm.poweroff()
        template = Template(_kept(vm, lab, f"{name}.qcow2"), True, None, machine_id, hardware)
        return Templates(template, None, {k: round(v, 1) for k, v in seconds.items()}, {})
    before = {m["host_id"] for m in server.machines()}
    t = time.monotonic()
    vm.ssh("systemctl start mobility-bootstrap.service", timeout=600)  # as the next boot would, now
    registered = wait_registered(server, before, name)
    seconds["bootstrap"] = time.monotonic() - t
    if agent_status(vm).get("host_id") != registered["host_id"]:
        raise VmLabError(f"{name}: the agent's status does not name {registered['host_id']}: {agent_status(vm)}")
    t = time.monotonic()
    vm.poweroff()
    unprepped = None
    if keep_unprepped:
        unprepped = Template(
            _kept(vm, lab, f"{name}-unprepped.qcow2"), False, registered["host_id"], machine_id, hardware
        )
    lab.start(vm)  # the same machine (same disk, same hardware) again
    vm.wait_booted()
    prep = json.loads(vm.run(f"{MOBILITY} template-prep --json").check("template-prep"))
    vm.poweroff()
    seconds["prep"] = time.monotonic() - t
    prepped = Template(_kept(vm, lab, f"{name}-prepped.qcow2"), True, registered["host_id"], machine_id, hardware)
    return Templates(prepped, unprepped, {k: round(v, 1) for k, v in seconds.items()}, prep)


# docs/templates.md, for a template whose bootstrapper never ran: systemd makes a new machine-id at each clone's first
# boot from an empty file, unless D-Bus's copy of the old one is there to take it from.
CLEAR_MACHINE_ID = (
    "truncate -s 0 /etc/machine-id && { [ -L /var/lib/dbus/machine-id ] || rm -f /var/lib/dbus/machine-id; }"
)


def _kept(vm: VM, lab: Lab, name: str) -> Disk:
    if vm.disk is None or vm.running:
        raise VmLabError(f"{vm.name}: no disk to keep, or it still runs")
    return vm.disk.keep_as(lab.workdir / name)


def failover_mark(kind: str, host_id: str, point_id: str) -> str:
    """The mark a failed-over machine is given as an SMBIOS OEM string (agent/lifecycle/failover.py): ``test`` or
    ``failover`` of the machine ``host_id`` at ``point_id``."""
    return f"mobility-failover:v1:{kind}:{host_id}:{point_id}"


def boot_point(
    lab: Lab,
    name: str,
    base: Image,
    failed_over: dict[str, Any],
    mark: str,
    forwards: Sequence[Forward] = (),
    hostname: str | None = None,
    cpu: str | None = None,
) -> VM:
    """A VM (not started) booting the images a `failover` wrote (``failed_over``: what it said), in the point's disk
    order (each through an overlay: the images are never written), told what it is by ``mark``. ``forwards``: what of
    the host it reaches (none: no route anywhere, as a test failover's isolated network)."""
    images = [Disk(Path(p), base, "raw") for p in failed_over["images"]]
    spec = Spec(forwards=forwards, oem_strings=(mark,), hostname=hostname, cpu=cpu)
    return lab.vm(name, images[0], spec, extra=images[1:])
