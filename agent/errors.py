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

    def diagnostics(self) -> str:
        """The two lines the CLI prints: ``error <code>: message`` and the fix."""
        return f"error {self.code}: {self.message}\n  fix: {self.fix}"


# Families -----------------------------------------------------------------


class UsageError(MobilityError):
    """The command line or a configuration value is wrong."""

    exit_code = Exit.USAGE


class LocalSystemError(MobilityError):
    """Something on this machine (files, permissions, disks) prevents the work."""


class UnsupportedError(MobilityError):
    """The machine is not one Mobility supports, cannot be identified, or a prerequisite failed."""

    exit_code = Exit.UNSUPPORTED


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


class PrerequisitesFailed(UnsupportedError):
    code = "PREREQ-FAILED"
    remediation = "Fix each failed check as its own line says, then run `mobility prereq` again."


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
