"""`mobility template-prep` on a machine root: what makes the machine itself goes, the installed agent stays. The
whole lifecycle in a VM (the daemon stopped, clones that register as themselves) is in
tests/integration/test_vm_templates.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.host.paths import Paths
from agent.lifecycle.template import template_prep
from tests.conftest import REPO

STATE = "var/lib/mobility"


def registered_root(root: Path) -> Path:
    """A root as a bootstrap leaves it: identity, certificate, state of a protected disk, logs, the agent's
    configuration, the OS's machine-id and D-Bus's copy of it (a file, as debootstrap leaves it)."""
    for name in ("identity.json", "client.key", "client.pem", "daemon.json", "last-job.json", "target.json"):
        (root / STATE / name).parent.mkdir(parents=True, exist_ok=True)
        (root / STATE / name).write_text("{}")
    (root / STATE / "replication/disks/vda").mkdir(parents=True)
    (root / STATE / "replication/disks/vda/state.json").write_text("{}")
    (root / STATE / "downloads").mkdir()
    (root / STATE / "freeze.json").write_text("{}")
    (root / "var/log/mobility").mkdir(parents=True)
    (root / "var/log/mobility/install.log").write_text("installed\n")
    (root / "etc/mobility").mkdir(parents=True)
    (root / "etc/mobility/bootstrap.conf").write_text("server = cs:9443\n")
    (root / "etc/machine-id").write_text("a" * 32 + "\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").write_text("a" * 32 + "\n")
    return root


def test_template_prep_strips_the_machine_and_keeps_the_agent(tmp_path: Path) -> None:
    root = registered_root(tmp_path)
    done = template_prep(Paths(root))
    assert not done.stopped_daemon  # under --root nothing runs to stop
    assert sorted(p.name for p in (root / STATE).iterdir()) == ["freeze.json"]
    assert list((root / "var/log/mobility").iterdir()) == []
    assert (root / "etc/mobility/bootstrap.conf").read_text() == "server = cs:9443\n"
    # The clone's systemd makes a machine-id of its own: the file is empty, D-Bus's copy (which systemd would take
    # the old ID from again) is gone.
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert {"/etc/machine-id (emptied)", "/var/lib/dbus/machine-id", "/var/lib/mobility/replication"} <= set(
        done.removed
    )
    assert template_prep(Paths(root)).removed == []  # a second run finds nothing left


def test_a_dbus_machine_id_that_links_to_the_os_one_stays_a_link(tmp_path: Path) -> None:
    root = registered_root(tmp_path)
    (root / "var/lib/dbus/machine-id").unlink()
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    template_prep(Paths(root))
    assert (root / "var/lib/dbus/machine-id").readlink() == Path("/etc/machine-id")
    assert (root / "etc/machine-id").read_text() == ""


def test_the_command_says_what_it_did(tmp_path: Path) -> None:
    root = registered_root(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "agent", "template-prep", "--root", str(root), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stopped_daemon"] is False
    assert "/var/lib/mobility/identity.json" in doc["removed"] and "/etc/machine-id (emptied)" in doc["removed"]
