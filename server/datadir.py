"""Every location in a configuration server's data directory (``--data``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/mobility-server")


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def tls_cert(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def tls_key(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def passphrase(self) -> Path:
        return self.root / "passphrase"

    @property
    def database(self) -> Path:
        return self.root / "mobility.db"

    @property
    def database_url(self) -> Path:
        """The PostgreSQL URL `init --database` recorded (no password): the database every command then uses."""
        return self.root / "database.url"

    @property
    def nonce_key(self) -> Path:
        """The key enrolment nonces are signed with (mode 0600): every instance sharing the directory checks them."""
        return self.root / "nonce.key"

    @property
    def repository_dir(self) -> Path:
        """Installer bundles: added with `repo add`, or dropped here by an operator (then `repo rescan`)."""
        return self.root / "repository"

    @property
    def tuf_dir(self) -> Path:
        """TUF signing keys (keys/, mode 0600) and the published metadata (metadata/)."""
        return self.root / "tuf"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def push_logs(self) -> Path:
        """The install log of every pushed host, one file per push job."""
        return self.root / "push-logs"

    @property
    def initialised_marker(self) -> Path:
        """Written last by `init`: its presence means the directory is complete."""
        return self.root / ".initialised"
