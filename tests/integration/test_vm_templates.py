"""Templates for real: Debian VMs (scripts/vmlab, QEMU) made into templates as docs/templates.md tells operators to,
whose clones bootstrap themselves at first boot under their own systemd, through the only route they have to the
host: `guestfwd` to the configuration server.

The images are built once (cached in .cache/vmlab/ across runs, made by the first worker that asks); at most two VMs
run at once on the machine (the lab's machine-wide slots), so these tests never boot more than two together."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.vmlab import DEBIAN11, DEBIAN12, Lab, Recipe, image
from scripts.vmlab.mobility import LabServer, agent_status, guest_facts, make_template, wait_registered
from tests.conftest import require_root

pytestmark = [pytest.mark.integration, pytest.mark.vm]


def bundles(dist: Path, recipe: Recipe) -> list[Path]:
    found = sorted(dist.glob(f"*_{recipe.os_tag}-64_*.tar.gz"))
    assert found, f"no {recipe.os_tag} bundle in {dist}"
    return found


@pytest.fixture
def server(dist: Path, tmp_path: Path) -> Iterator[LabServer]:
    s = LabServer.start(tmp_path / "data", bundles(dist, DEBIAN12) + bundles(dist, DEBIAN11), heartbeat_interval=5)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Lab(tmp_path / "lab") as made:
        yield made


def healthy_and_heartbeating(server: LabServer, host_id: str) -> dict[str, Any]:
    """The machine's record once a heartbeat newer than the one that made it healthy arrived."""
    first = server.machine(host_id)
    assert first is not None and first["health"] == "healthy", first
    deadline = time.monotonic() + 120
    while not any(m.host_id == host_id and (m.last_seen or 0) > first["last_seen"] for m in server.poll()):
        assert time.monotonic() < deadline, f"no second heartbeat from {host_id}: {server.machine(host_id)}"
        time.sleep(1)
    now = server.machine(host_id)
    assert now is not None and (now["state"], now["health"]) == ("online", "healthy"), now
    return now


def test_clones_of_a_template_become_machines_of_their_own(
    lab: Lab, server: LabServer, dist: Path, tmp_path: Path
) -> None:
    """Two clones of a prepped template and one of an unprepped template register as three distinct, healthy
    machines; the template's own identity is never reused."""
    made = make_template(lab, image(DEBIAN12), server, dist, keep_unprepped=True)
    assert made.unprepped is not None
    template_id = made.prepped.host_id
    assert template_id is not None
    # template-prep stopped the daemon and cleared the machine-id as well as the agent's identity.
    assert made.prep["stopped_daemon"] is True
    assert {"/var/lib/mobility/identity.json", "/etc/machine-id (emptied)"} <= set(made.prep["removed"])
    template_seen = server.machine(template_id)
    assert template_seen is not None

    # Two clones of the prepped template, booted together: each its own machine (new machine-ids: systemd made them).
    before = {m["host_id"] for m in server.machines()}
    a = lab.vm("clone-a", made.prepped.disk, server.spec(hostname="clone-a"))
    b = lab.vm("clone-b", made.prepped.disk, server.spec(hostname="clone-b"))
    lab.start(a, b)
    clones = {vm.name: wait_registered(server, before, vm.name) for vm in (a, b)}
    facts = {vm.name: guest_facts(vm) for vm in (a, b)}
    for vm in (a, b):
        machine = clones[vm.name]
        assert machine["host_id"] != template_id and machine["cloned_from"] is None, machine
        assert machine["facts"]["machine_id"] == facts[vm.name]["machine_id"]
        healthy_and_heartbeating(server, machine["host_id"])
        status = agent_status(vm)
        assert (status["host_id"], status["daemon"], status["health"]) == (machine["host_id"], "running", "healthy")
        # Boot never waited for the bootstrapper (mobility-bootstrap.service opts out of the target's ordering).
        after = vm.run("systemctl show -p After --value multi-user.target").check()
        assert "mobility-bootstrap.service" not in after.split()
    assert clones["clone-a"]["host_id"] != clones["clone-b"]["host_id"]
    assert len({made.prepped.machine_id, facts["clone-a"]["machine_id"], facts["clone-b"]["machine_id"]}) == 3
    a.poweroff()
    b.poweroff()

    # A clone of the template as it was before template-prep: the template's registration, key and machine-id, on
    # other hardware (a new DMI UUID, as any hypervisor gives a clone). It is told from the template and registers
    # as a clone of it; its daemon, started at boot with the template's identity, never spoke as the template.
    before = {m["host_id"] for m in server.machines()}
    u = lab.vm("clone-u", made.unprepped.disk, server.spec(hostname="clone-u"))
    lab.start(u)
    copy = wait_registered(server, before, "clone-u")
    assert guest_facts(u)["machine_id"] == made.unprepped.machine_id  # the same machine-id in every copy
    assert copy["host_id"] != template_id and copy["cloned_from"] == template_id, copy
    healthy_and_heartbeating(server, copy["host_id"])
    assert agent_status(u)["host_id"] == copy["host_id"]
    # The template's record is as the template left it: nothing reached the server in its name.
    template_now = server.machine(template_id)
    assert template_now is not None
    assert (template_now["last_seen"], template_now["health_report"]) == (
        template_seen["last_seen"],
        template_seen["health_report"],
    )
    journal = u.run("journalctl -b -u mobility.service --no-pager -o cat").check()
    assert f"this machine is a copy of {template_id}" in journal, journal
    u.poweroff()

    # Three new machines besides the template, and every install job succeeded.
    machines = {m["host_id"]: m for m in server.machines()}
    assert len(machines) == 4 and machines[template_id]["hostname"] == "template"
    jobs = server.jobs()
    assert len(jobs) == 4 and {j["state"] for j in jobs} == {"succeeded"}, jobs


def test_a_debian11_template_baked_without_registering(lab: Lab, server: LabServer, dist: Path) -> None:
    """Debian 11 (glibc 2.31, kernel 5.10): the bootstrapper baked in but never run in the template (the machine-id
    cleared by hand, as the page says for that way); a clone bootstraps at first boot."""
    made = make_template(lab, image(DEBIAN11), server, dist, register=False)
    assert made.prepped.host_id is None and server.machines() == []
    clone = lab.vm("clone-11", made.prepped.disk, server.spec(hostname="clone-11"))
    lab.start(clone)
    machine = wait_registered(server, set(), "clone-11")
    assert (machine["os_tag"], machine["cloned_from"]) == ("DEBIAN11", None)
    assert guest_facts(clone)["machine_id"] != made.prepped.machine_id
    healthy_and_heartbeating(server, machine["host_id"])
    assert agent_status(clone)["host_id"] == machine["host_id"]
    clone.poweroff()
