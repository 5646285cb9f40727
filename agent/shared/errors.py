"""The error root, its families and the errors both sides raise: every user-facing failure is a subclass of
``MobilityError`` with a stable ``code`` (catalogued in docs/errors.md), a default remediation and the process exit
code the command line uses. Third-party exceptions are converted at the boundary with ``raise ... from e``.

The agent's own errors are in agent/errors.py, the server's in server/errors.py; both subclass the families here.
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


# Raised on both sides ---------------------------------------------------------------------------------


class BadArguments(UsageError):
    code = "USAGE"
    remediation = "Run the command with --help to see the accepted options."


class ServerAddressInvalid(UsageError):
    code = "SERVER-ADDRESS-INVALID"
    remediation = "Give the configuration server as HOST or HOST:PORT (e.g. cs.example.com:9443 or 10.0.0.5)."


class PassphraseFileError(LocalSystemError):
    code = "PASSPHRASE-FILE"
    remediation = "Put the passphrase or token alone in a root-owned file, mode 0600 (chmod 600 FILE); pass it with -P."


class BundleRefused(VerificationError):
    code = "BUNDLE-REFUSED"
    remediation = (
        "Use an installer bundle as built by packaging/ (named "
        "Mobility_UA_<version>_<OSTAG>-64_GA_<DDMonYYYY>_release.tar.gz, with a matching bundle.json); "
        "rebuild or re-download the one named in the message."
    )


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
