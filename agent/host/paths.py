"""Every location on a source machine, relative to one injectable root (``--root``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import RootNotDirectory, RootNotFound, RootSymlinkLoop

_MAX_SYMLINK_HOPS = 40  # the kernel's own limit (MAXSYMLINKS)


def _parts(system_path: str) -> list[str]:
    pure = PurePosixPath(system_path)
    if not pure.is_absolute():
        # Callers parse paths from input at the edge (agent/lifecycle/install_dir.py); a relative one here is a bug.
        raise ValueError(f"{system_path!r} is not an absolute path inside the system")
    return [p for p in pure.parts[1:] if p != "."]  # parts[0] is "/" (or "//", which POSIX allows)


@dataclass(frozen=True)
class Paths:
    """Paths of the system rooted at ``root`` (``/`` for the running machine).

    Absolute paths inside the system are mapped under ``root``; symbolic links are
    followed as a chroot would, so an absolute link inside the tree never escapes it.
    Directories are fully resolved (``resolve``); a file is its resolved directory plus
    its own name, not followed (``__call__``), so that a rename or an unlink acts on the
    name itself. Every location below comes from one of the two.
    """

    root: Path = Path("/")

    @classmethod
    def checked(cls, root: str | os.PathLike[str] | None) -> Paths:
        """Paths for ``root`` after checking that it is an existing directory."""
        if root is None:
            return cls(Path("/"))
        p = Path(root)
        if not p.exists():
            raise RootNotFound(f"--root {p}: no such directory")
        if not p.is_dir():
            raise RootNotDirectory(f"--root {p}: is not a directory")
        return cls(p.resolve())

    def __call__(self, system_path: str) -> Path:
        """The host path of the *name* ``system_path`` as a chroot sees it: every directory on the way resolved
        inside the root (``..`` clamped at the root, absolute and relative links followed inside it), the last
        component itself not followed. Writing by rename, unlinking or making a link there acts on that name,
        never through a link planted in the root to a place outside it (e.g. an absolute link to the host's /etc).
        """
        parts = _parts(system_path)
        if not parts or parts[-1] == "..":
            return self.resolve(system_path)
        return self._resolve_parts(parts[:-1]) / parts[-1]

    def resolve(self, system_path: str) -> Path:
        """The host path of ``system_path`` with every component resolved inside the root, the last one too:
        for a directory the agent writes into, and for a file it reads (as a chroot would read it).

        Raises ``RootSymlinkLoop`` when links loop (as the kernel's ELOOP): a shortened path is never returned.
        """
        return self._resolve_parts(_parts(system_path))

    def _resolve_parts(self, parts: list[str]) -> Path:
        pending = list(parts)
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            host = self.root.joinpath(*done, part)
            if host.is_symlink():
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise RootSymlinkLoop(
                        f"/{'/'.join(parts)} inside {self.root}: more than {_MAX_SYMLINK_HOPS} symbolic links "
                        f"(a loop at /{'/'.join([*done, part])}?)"
                    )
                target = PurePosixPath(os.readlink(host))
                if target.is_absolute():
                    done = []
                    pending = list(target.relative_to("/").parts) + pending
                else:
                    pending = list(target.parts) + pending
                continue
            done.append(part)
        return self.root.joinpath(*done)

    def system_path(self, host: Path) -> str:
        """The path inside the system of a host path under the root (for messages and policy checks)."""
        return "/" + str(host.relative_to(self.root)) if host != self.root else "/"

    # Locations of the agent on the source machine ------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.resolve("/etc/mobility")

    @property
    def bootstrap_conf(self) -> Path:
        return self.config_dir / "bootstrap.conf"

    @property
    def freeze_dir(self) -> Path:
        return self.resolve("/etc/mobility/freeze.d")

    @property
    def state_dir(self) -> Path:
        return self.resolve("/var/lib/mobility")

    @property
    def log_dir(self) -> Path:
        return self.resolve("/var/log/mobility")

    @property
    def agent_config(self) -> Path:
        """What install recorded: version, install dir, role, platform (JSON, agent/lifecycle/installed.py)."""
        return self.config_dir / "agent.json"

    @property
    def install_log(self) -> Path:
        return self.log_dir / "install.log"

    @property
    def install_lock(self) -> Path:
        return self.state_dir / "install.lock"

    @property
    def update_lock(self) -> Path:
        """Held by the one upgrade (or rollback) in progress, for its whole life (agent/update/state.py)."""
        return self.state_dir / "update.lock"

    @property
    def switch_lock(self) -> Path:
        """Shared by work the agent must not switch versions under (a recovery point), exclusive while an upgrade or
        a rollback switches and restarts (agent/update/state.py)."""
        return self.state_dir / "switch.lock"

    @property
    def update_record(self) -> Path:
        """The upgrade in progress or the last one: phase, versions, outcome (JSON, agent/update/state.py)."""
        return self.state_dir / "update.json"

    @property
    def update_target(self) -> Path:
        """The version the server last named for this machine (JSON, agent/update/state.py)."""
        return self.state_dir / "target.json"

    @property
    def upgrade_marker(self) -> Path:
        """The version whose program watches an unfinished upgrade, as plain text for the SysV init script
        (agent/update/state.py); absent when none is unfinished."""
        return self.state_dir / "upgrade.from"

    @property
    def daemon_status(self) -> Path:
        """The daemon's last record of itself, its heartbeats and its health (JSON, agent/daemon/status.py)."""
        return self.state_dir / "daemon.json"

    @property
    def replication_dir(self) -> Path:
        """Replication's status, `mobility point` requests, each protected disk's state and chunk hashes
        (agent/replication/state.py)."""
        return self.state_dir / "replication"

    @property
    def run_dir(self) -> Path:
        """The agent's runtime files (/run: a tmpfs, emptied at boot, never frozen by a point)."""
        return self.resolve("/run/mobility")

    @property
    def freeze_record(self) -> Path:
        """The filesystems a point froze, recorded before the freeze, removed after the thaw (JSON,
        agent/replication/frozen.py)."""
        return self.run_dir / "frozen.json"

    @property
    def freeze_state(self) -> Path:
        """The freeze provider's set-up: ready or not, and why (JSON, agent/lifecycle/freeze.py)."""
        return self.state_dir / "freeze.json"

    @property
    def failover_record(self) -> Path:
        """This machine as a failover of a protected machine: which point, of whom, and the identity it registered
        as (JSON, agent/lifecycle/failover.py)."""
        return self.state_dir / "failover.json"

    @property
    def recovery_dir(self) -> Path:
        """The machine's own recovery checks: executables run in a failed-over copy of it (agent/recovery/)."""
        return self.resolve("/etc/mobility/recovery.d")

    @property
    def agent_log(self) -> Path:
        return self.log_dir / "agent.log"

    @property
    def daemon_output(self) -> Path:
        """The stdout and stderr of the daemon the upgrade watcher last started where no init system does (its
        crash at start included), for the upgrade job's detail (agent/update/daemonctl.py)."""
        return self.log_dir / "daemon.out"

    @property
    def last_job(self) -> Path:
        """The last job this machine ran and reported (JSON, agent/lifecycle/lastjob.py)."""
        return self.state_dir / "last-job.json"

    @property
    def identity(self) -> Path:
        """Host ID, machine facts and server of the registration (JSON, agent/lifecycle/identity.py)."""
        return self.state_dir / "identity.json"

    @property
    def client_key(self) -> Path:
        return self.state_dir / "client.key"

    @property
    def pending_enrolment(self) -> Path:
        """The key of an enrolment sent but not answered yet, with the facts it was for (JSON, mode 0600,
        agent/lifecycle/identity.py): a retry sends the same key, so the server knows it for the same machine."""
        return self.state_dir / "pending-enrolment.json"

    @property
    def client_cert(self) -> Path:
        return self.state_dir / "client.pem"

    @property
    def server_ca(self) -> Path:
        """The server's CA, pinned (or trusted on first use) before any secret is sent."""
        return self.state_dir / "server-ca.pem"

    @property
    def tuf_dir(self) -> Path:
        """The agent's trusted TUF metadata of the installer repository."""
        return self.resolve("/var/lib/mobility/tuf")

    @property
    def tuf_metadata_dir(self) -> Path:
        """Where python-tuf keeps the verified metadata between runs (what makes a rollback detectable)."""
        return self.resolve("/var/lib/mobility/tuf/metadata")

    @property
    def downloads_dir(self) -> Path:
        """Downloaded bundles, verified by TUF."""
        return self.resolve("/var/lib/mobility/downloads")

    @property
    def staging_dir(self) -> Path:
        """Bundles unpacked before install copies them."""
        return self.resolve("/var/lib/mobility/staging")

    def install_dir(self, system_path: str) -> Path:
        """The host path of the install directory (``-d``, parsed by agent/lifecycle/install_dir.py), resolved inside
        the root."""
        return self.resolve(system_path)
