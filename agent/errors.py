"""One error root with stable IDs; every user-facing failure is a subclass here.

Each concrete class carries a stable ``code`` (catalogued in docs/errors.md), a
default remediation and the process exit code the CLI uses. Third-party
exceptions are converted at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class Exit(IntEnum):
    """Process exit codes (DESIGN.md, "Errors")."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNSUPPORTED = 3
    TEMPFAIL = 75


class MobilityError(Exception):
    """Root of every error Mobility reports to a user."""

    code: ClassVar[str] = ""
    remediation: ClassVar[str] = ""
    exit_code: ClassVar[Exit] = Exit.ERROR

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix if fix is not None else self.remediation
        self.id = self.code  # the stable ID shown; a RemoteError shows the server's own

    def diagnostics(self) -> str:
        """The two lines the CLI prints: ``error <ID>: message`` and the fix."""
        return f"error {self.id}: {self.message}\n  fix: {self.fix}"

    def to_json(self) -> dict[str, str]:
        return {"code": self.id, "message": self.message, "fix": self.fix}


# Families -----------------------------------------------------------------


class UsageError(MobilityError):
    """The command line or a configuration value is wrong."""

    exit_code = Exit.USAGE


class LocalSystemError(MobilityError):
    """Something on this machine (files, permissions, disks) prevents the work."""


class RemoteStateError(MobilityError):
    """The server refused or does not know something (wrong passphrase, unknown host)."""


class TransportError(MobilityError):
    """Talking to the server failed: connection, TLS, protocol."""


class UnsupportedError(MobilityError):
    """The machine is not one Mobility supports, cannot be identified, or a prerequisite failed."""

    exit_code = Exit.UNSUPPORTED


class TemporaryError(MobilityError):
    """A server, the network or a lock is unavailable right now; the same command may succeed later."""

    exit_code = Exit.TEMPFAIL


class VerificationError(MobilityError):
    """Content failed verification: a bundle or signed repository metadata is not what it claims to be."""


# Concrete errors ------------------------------------------------------------


class BadArguments(UsageError):
    code = "USAGE"
    remediation = "Run the command with --help to see the accepted options."


class RootNotFound(UsageError):
    code = "ROOT-NOT-FOUND"
    remediation = "Pass --root a directory that exists (the root of the system to inspect), or omit it."


class RootNotDirectory(UsageError):
    code = "ROOT-NOT-DIR"
    remediation = "Pass --root a directory (the root of a filesystem tree), not a file."


class ReleaseFileUnreadable(UnsupportedError):
    code = "OS-RELEASE-UNREADABLE"
    remediation = (
        "Restore the named release file from the distribution's package "
        "(e.g. base-files, redhat-release, sles-release) so that it is plain text."
    )


class ReleaseFilesConflict(UnsupportedError):
    code = "OS-RELEASE-CONFLICT"
    remediation = (
        "The release files disagree about the system's version; reinstall the distribution's "
        "release package so that they agree, or remove the stale file."
    )


class OsUnknown(UnsupportedError):
    code = "OS-UNKNOWN"
    remediation = (
        "Make sure the root holds the distribution's release files (/etc/os-release or "
        "/usr/lib/os-release, or the legacy /etc/*-release files); see `mobility detect-os --help`."
    )


class OsUnsupported(UnsupportedError):
    code = "OS-UNSUPPORTED"
    remediation = "Install the agent on one of the supported systems listed in the message (docs/support-matrix.md)."


class OsKernelTooOld(UnsupportedError):
    code = "OS-KERNEL-TOO-OLD"
    remediation = (
        "Protect this machine after upgrading it to a release the support matrix lists as supported "
        "(docs/support-matrix.md); no build of the agent runs on this release's kernel generation yet."
    )


class PrerequisitesFailed(UnsupportedError):
    code = "PREREQ-FAILED"
    remediation = "Fix each failed check as its own line says, then run `mobility prereq` again."


class RemoteError(RemoteStateError):
    """An error the server reported, shown with the server's own ID, message and fix."""

    code = "SERVER-ERROR"
    remediation = "See the server's message; docs/errors.md lists every ID."

    def __init__(self, code: str, message: str, fix: str) -> None:
        super().__init__(message, fix=fix)
        self.id = code


# Installer bundles and the signed repository (agent/bundles.py, agent/fetch.py, server/repository.py)


class BundleRefused(VerificationError):
    code = "BUNDLE-REFUSED"
    remediation = (
        "Use an installer bundle as built by packaging/ (named "
        "Mobility_UA_<version>_<OSTAG>-64_GA_<DDMonYYYY>_release.tar.gz, with a matching bundle.json); "
        "rebuild or re-download the one named in the message."
    )


class RepoNotInitialised(LocalSystemError):
    code = "REPO-NOT-INITIALISED"
    remediation = "Run `mobility-server init --data DIR` first, or pass --data the directory that was initialised."


class RepoDamaged(LocalSystemError):
    code = "REPO-DAMAGED"
    remediation = (
        "The repository's keys or metadata under DATA/tuf are unreadable or disagree; "
        "restore DATA/tuf from a backup of the same server."
    )


class RepoNoSuchBundle(UsageError):
    code = "REPO-NO-SUCH-BUNDLE"
    remediation = "Run `mobility-server repo list` to see the bundle names the repository holds."


class RepoBundleConflict(UsageError):
    code = "REPO-BUNDLE-CONFLICT"
    remediation = (
        "A different bundle with the same name is already published; remove it first "
        "(`mobility-server repo remove NAME`) or build the new one with a new version."
    )


class RepoBusy(TemporaryError):
    code = "REPO-BUSY"
    remediation = "Another mobility-server command is changing the repository; wait for it to finish and retry."


class TufTampered(VerificationError):
    code = "TUF-TAMPERED"
    remediation = (
        "Do not install this bundle. Check that the agent talks to the right configuration server and that "
        "nothing rewrites its files; on the server, run `mobility-server repo rescan` to re-sign the repository."
    )


class TufRollback(VerificationError):
    code = "TUF-ROLLBACK"
    remediation = (
        "The server offered older repository metadata than this machine has already seen; check that the "
        "configuration server (or a mirror) was not restored from an old backup, then retry."
    )


class TufExpired(VerificationError):
    code = "TUF-EXPIRED"
    remediation = (
        "Check the clocks of this machine and the configuration server (NTP); a running `mobility-server serve` "
        "re-signs the timestamp daily, so start it if it is stopped."
    )


class TufNoBundle(RemoteStateError):
    code = "TUF-NO-BUNDLE"
    remediation = (
        "Add an installer bundle for this OS tag on the configuration server "
        "(`mobility-server repo add FILE`, or drop it into the repository and run `mobility-server repo rescan`)."
    )


class TufFetchFailed(TemporaryError):
    code = "TUF-FETCH-FAILED"
    remediation = (
        "Check that the configuration server is running and reachable from this machine (address, port, "
        "firewall, TLS certificate); the bootstrapper retries later by itself."
    )


class FetchWriteFailed(LocalSystemError):
    code = "FETCH-WRITE-FAILED"
    remediation = "Make sure the agent's state directory is writable and its filesystem has free space."


class ServerAddressInvalid(UsageError):
    code = "SERVER-ADDRESS-INVALID"
    remediation = "Give the configuration server as HOST or HOST:PORT (e.g. cs.example.com:9443 or 10.0.0.5)."


class FingerprintInvalid(UsageError):
    code = "FINGERPRINT-INVALID"
    remediation = "Give the fingerprint as `mobility-server init` printed it: sha256:<64 hex digits>."


class PassphraseFileError(LocalSystemError):
    code = "PASSPHRASE-FILE"
    remediation = "Put the passphrase or token alone in a root-owned file, mode 0600 (chmod 600 FILE); pass it with -P."


class ServerUnreachable(TemporaryError):
    code = "SERVER-UNREACHABLE"
    remediation = "Check the server address and port, that `mobility-server serve` runs, and the network; retry later."


class FingerprintMismatch(TransportError):
    code = "SERVER-FINGERPRINT-MISMATCH"
    remediation = (
        "The server's CA is not the one pinned: check --cs-fingerprint against `mobility-server init`'s output; "
        "if the server was re-initialised on purpose, remove /var/lib/mobility/server-ca.pem to trust it again."
    )


class ServerProtocolError(TransportError):
    code = "SERVER-PROTOCOL"
    remediation = "The server answered something that is not the Mobility API; check the address and versions."


class NotRegistered(RemoteStateError):
    code = "NOT-REGISTERED"
    remediation = "Register this machine first: `mobility configure -i HOST[:PORT] -P PASSPHRASE_FILE`."


class BundleWrongOs(UnsupportedError):
    code = "BUNDLE-WRONG-OS"
    remediation = "Use the bundle whose name carries this system's OS tag (`mobility detect-os` prints it)."


class InstallBusy(TemporaryError):
    code = "INSTALL-BUSY"
    remediation = "Another install, uninstall or bootstrap is running; wait for it to finish and try again."


class InstallFailed(LocalSystemError):
    code = "INSTALL-FAILED"
    remediation = "See /var/log/mobility/install.log; fix what it names (space, permissions) and run install again."


class ConfirmationRequired(UsageError):
    code = "CONFIRM-REQUIRED"
    remediation = "Pass -Y to confirm that the agent, its state and its logs are to be removed."


class ConfigInvalid(UsageError):
    code = "CONFIG-INVALID"
    remediation = "Fix /etc/mobility/mobility.conf: a JSON object of the settings in docs/configuration.md."


class RootRequired(UsageError):
    code = "ROOT-REQUIRED"
    remediation = "Run the command as root (sudo): it reads the agent's private state."


class CommandFailed(LocalSystemError):
    code = "COMMAND-FAILED"
    remediation = "See the command's message above and /var/log/mobility/install.log; fix it and run again."


class BootstrapConfigInvalid(UsageError):
    code = "BOOTSTRAP-CONF-INVALID"
    remediation = "Fix /etc/mobility/bootstrap.conf: `key = value` lines (server, fingerprint, passphrase_file, ...)."


class IoFailed(LocalSystemError):
    code = "IO-FAILED"
    remediation = (
        "Check the file or directory named in the message: that it exists, that this user may write it, and that "
        "its filesystem has free space and is not read-only; then run the command again."
    )

    @classmethod
    def from_os_error(cls, e: OSError) -> IoFailed:
        """An OSError as the error a user sees: the path and the reason, never a traceback."""
        where = f"{e.filename}: " if e.filename else ""
        return cls(f"{where}{e.strerror or e}")


class FreezeNotReady(LocalSystemError):
    """Not raised: the ID and fix a job carries when it `succeeded with warnings` for this reason."""

    code = "FREEZE-NOT-READY"
    remediation = "Run `mobility freeze-provider install` (on a filesystem with FIFREEZE: ext4, XFS, btrfs)."


# Security hardening, agent side (issue 11): install directory ownership, paths under --root, output files ----


class InstallDirInvalid(UsageError):
    code = "INSTALL-DIR-INVALID"
    remediation = (
        "Give -d (or install_dir in bootstrap.conf) an absolute path of a directory for the agent alone, "
        "such as /usr/local/mobility or /opt/mobility: not /, a system directory, or a path with '..'."
    )


class InstallDirNotOurs(LocalSystemError):
    code = "INSTALL-DIR-NOT-OURS"
    remediation = (
        "The install directory holds files Mobility did not put there, or others than root could change it: "
        "choose a new or empty directory for -d (e.g. /opt/mobility), or make it root's alone (chmod 755, chown root)."
    )


class RootSymlinkLoop(LocalSystemError):
    code = "ROOT-SYMLINK-LOOP"
    remediation = "Fix the symbolic links named in the message (inside --root, or on this machine): they loop."


class DiagnosticsWriteFailed(LocalSystemError):
    code = "DIAGNOSTICS-WRITE-FAILED"
    remediation = "Give -o a file in an existing, writable directory with free space (e.g. -o /root/diag.tar.gz)."


# Printed by the static launchers of the frozen programs (packaging/launcher/), not raised in Python: catalogued here
# so that their IDs and remediations have one home (the packaging tests compare what the launchers print).


class RuntimeMissing(LocalSystemError):
    code = "RUNTIME-MISSING"
    remediation = (
        "Reinstall the agent from its bundle, or download the bootstrapper again: the runtime files beside the "
        "launcher are missing or damaged."
    )


class BootstrapUnpackFailed(LocalSystemError):
    code = "BOOTSTRAP-UNPACK-FAILED"
    remediation = (
        "Make sure /var/lib/mobility is a local, writable directory owned by root (not writable by others) with 100 "
        "MiB free, or set MOBILITY_BOOTSTRAP_CACHE to such a directory, then run the bootstrapper again."
    )


def all_errors() -> dict[str, type[MobilityError]]:
    """Every concrete error class by its code (the catalogue test compares this with docs/errors.md)."""
    found: dict[str, type[MobilityError]] = {}
    pending: list[type[MobilityError]] = [MobilityError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "code" in cls.__dict__ and cls.code:
            if cls.code in found and found[cls.code] is not cls:
                raise RuntimeError(f"duplicate error code {cls.code}")
            found[cls.code] = cls
    return found
