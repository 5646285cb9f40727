"""`mobility template-prep`: strip what makes this machine itself before an image is captured (as
`cloud-init clean` and virt-sysprep do), so that clones never share an identity. The installed agent and its
configuration stay, so a clone only registers at its first boot.

On the running machine the daemon is stopped first: it would otherwise write its records again (its status at
every heartbeat and when the machine shuts down) into the image being captured. The OS's machine-id is cleared too:
/etc/machine-id emptied (systemd makes a new one at the clone's first boot) and D-Bus's copy of it removed, which
systemd would otherwise take the old ID from again (Debian's dbus leaves a copy, not a link, on a system installed
with debootstrap). Without a machine-id of its own, every clone would be the same machine to the server but for its
DMI UUID."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from agent.host.paths import Paths
from agent.shared.fsutil import atomic_write, remove

# The machine's own: its identity, and what the server told it (its target version) and its upgrades.
IDENTITY_FILES = (
    "identity.json",
    "client.key",
    "client.pem",
    "pending-enrolment.json",
    "daemon.json",
    "last-job.json",
    "target.json",
    "update.json",
    "upgrade.from",
)
# Whole directories of this machine's state: downloads, unpacked bundles, and replication (what this machine's disks
# sent, under this machine's identity).
STATE_DIRS = ("/var/lib/mobility/downloads", "/var/lib/mobility/staging", "/var/lib/mobility/replication")
MACHINE_ID = "/etc/machine-id"
DBUS_MACHINE_ID = "/var/lib/dbus/machine-id"


@dataclass
class Prepped:
    stopped_daemon: bool = False
    removed: list[str] = field(default_factory=list)  # system paths; the machine-id is listed as emptied


def template_prep(paths: Paths) -> Prepped:
    """Stop the daemon (on the running machine), remove identity, certificate, state, downloads and logs, and clear
    the machine-id (names inside the root; a link is removed, not followed)."""
    from agent.lifecycle.services import stop_daemon

    prepped = Prepped(stop_daemon(paths, disable=False))
    done = prepped.removed
    for name in IDENTITY_FILES:
        if remove(paths(f"/var/lib/mobility/{name}")):
            done.append(f"/var/lib/mobility/{name}")
    for system_path in STATE_DIRS:
        if remove(paths(system_path)):
            done.append(system_path)
    log_dir = paths.log_dir
    if log_dir.is_dir():
        for log in sorted(log_dir.iterdir()):
            if not stat.S_ISDIR(log.lstat().st_mode):
                log.unlink()
                done.append(f"/var/log/mobility/{log.name}")
    machine_id = paths(MACHINE_ID)
    if machine_id.is_file() and not machine_id.is_symlink() and machine_id.stat().st_size:
        atomic_write(machine_id, b"", 0o444)  # empty, not absent: systemd then makes one at boot, read-only / too
        done.append(f"{MACHINE_ID} (emptied)")
    dbus = paths(DBUS_MACHINE_ID)
    if dbus.is_file() and not dbus.is_symlink():  # a link to /etc/machine-id follows it by itself
        remove(dbus)
        done.append(DBUS_MACHINE_ID)
    return prepped
