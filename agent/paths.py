"""Every location on a source machine, relative to one injectable root (``--root``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import RootNotDirectory, RootNotFound

_MAX_SYMLINK_HOPS = 40  # the kernel's own limit (MAXSYMLINKS)


@dataclass(frozen=True)
class Paths:
    """Paths of the system rooted at ``root`` (``/`` for the running machine).

    Absolute paths inside the system are mapped under ``root``; symbolic links are
    followed as a chroot would, so an absolute link inside the tree never escapes it.
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
        """The host path of ``system_path`` (an absolute path inside the system), links not followed."""
        rel = PurePosixPath(system_path).relative_to("/")
        return self.root / rel

    def resolve(self, system_path: str) -> Path:
        """The host path of ``system_path`` with every symlink resolved inside the root."""
        parts = list(PurePosixPath(system_path).relative_to("/").parts)
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
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
                    break
                target = PurePosixPath(os.readlink(host))
                if target.is_absolute():
                    done = []
                    parts = list(target.relative_to("/").parts) + parts
                else:
                    parts = list(target.parts) + parts
                continue
            done.append(part)
        return self.root.joinpath(*done)

    # Locations of the agent on the source machine ------------------------------------

    @property
    def config_dir(self) -> Path:
        return self("/etc/mobility")

    @property
    def bootstrap_conf(self) -> Path:
        return self("/etc/mobility/bootstrap.conf")

    @property
    def freeze_dir(self) -> Path:
        return self("/etc/mobility/freeze.d")

    @property
    def state_dir(self) -> Path:
        return self("/var/lib/mobility")

    @property
    def log_dir(self) -> Path:
        return self("/var/log/mobility")

    @property
    def default_install_dir(self) -> Path:
        return self("/usr/local/mobility")

    @property
    def agent_config(self) -> Path:
        """What install recorded: version, install dir, role, platform (JSON)."""
        return self.config_dir / "agent.json"

    @property
    def install_log(self) -> Path:
        return self.log_dir / "install.log"

    @property
    def install_lock(self) -> Path:
        return self.state_dir / "install.lock"

    @property
    def daemon_status(self) -> Path:
        """The daemon's last record of itself, its heartbeats and its health (JSON)."""
        return self.state_dir / "daemon.json"

    @property
    def agent_log(self) -> Path:
        return self.log_dir / "agent.log"

    @property
    def last_job(self) -> Path:
        return self.state_dir / "last-job.json"

    @property
    def identity(self) -> Path:
        """Host ID, machine facts and server of the registration (JSON)."""
        return self.state_dir / "identity.json"

    @property
    def client_key(self) -> Path:
        return self.state_dir / "client.key"

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
        return self.state_dir / "tuf"

    def install_dir(self, system_path: str | None) -> Path:
        """The host path of the install directory (``-d``), default /usr/local/mobility."""
        return self(system_path) if system_path else self.default_install_dir
