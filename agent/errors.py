"""The agent's own errors: each a subclass of a family of the error root (agent/shared/errors.py), with a stable
``code`` catalogued in docs/errors.md, a default remediation and the exit code the command line uses."""

from __future__ import annotations

from agent.shared.errors import (
    Exit,
    LocalSystemError,
    RemoteStateError,
    TemporaryError,
    TransportError,
    UnsupportedError,
    UsageError,
    VerificationError,
)


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


class AgentNotInstalled(UnsupportedError):
    code = "AGENT-NOT-INSTALLED"
    remediation = (
        "Install and register the agent on this machine: `mobility bootstrap -i HOST[:PORT] -P PASSPHRASE_FILE "
        "--cs-fingerprint sha256:HEX` (or push it from the server with `mobility-server push`)."
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


class RemoteBusy(RemoteError):
    """The server answered 503 (busy, or its database unavailable) or 429 (rate limited): a temporary failure, to be
    retried after ``retry_after`` seconds (its Retry-After header), never at once."""

    exit_code = Exit.TEMPFAIL

    def __init__(self, code: str, message: str, fix: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(code, message, fix)
        self.status = status
        self.retry_after = retry_after


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


class FingerprintInvalid(UsageError):
    code = "FINGERPRINT-INVALID"
    remediation = "Give the fingerprint as `mobility-server init` printed it: sha256:<64 hex digits>."


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


# Self-update (agent/update/, docs/updates.md): the watcher's verdicts are the error IDs of a failed upgrade job.


class UpdateBusy(TemporaryError):
    code = "UPDATE-BUSY"
    remediation = (
        "Another upgrade or rollback, an install or a recovery point is in progress; the agent tries again by itself "
        "(or run `mobility upgrade` once it has finished)."
    )


class UpdateRolledBack(LocalSystemError):
    """The health gate rolled a new version back: the machine runs its previous version again (a family; each
    verdict has its own ID)."""


class UpdateCrashed(UpdateRolledBack):
    code = "UPDATE-CRASHED"
    remediation = (
        "The new version did not start or kept exiting, so the machine runs its previous version again and the "
        "server pinned it there: read the new version's log in the job's detail and /var/log/mobility/agent.log, "
        "fix or replace the version, then `mobility-server unpin` the machine."
    )


class UpdateUnreachable(UpdateRolledBack):
    code = "UPDATE-UNREACHABLE"
    remediation = (
        "The new version could not reach the server while the previous one (and the watcher) could: check what it "
        "changed in how it connects (TLS, proxy, its unit's sandboxing); the machine runs its previous version, "
        "pinned to it until you `mobility-server unpin` it."
    )


class UpdateCritical(UpdateRolledBack):
    code = "UPDATE-CRITICAL"
    remediation = (
        "The new version reported CRITICAL in a health check that passed under the previous one (the job's detail "
        "names it); the machine runs its previous version, pinned to it until you `mobility-server unpin` it."
    )


class UpdateNotHealthy(UpdateRolledBack):
    code = "UPDATE-NOT-HEALTHY"
    remediation = (
        "The new version ran but did not reach the server and report healthy within the health window "
        "(update_window_seconds); the machine runs its previous version, pinned to it until you "
        "`mobility-server unpin` it."
    )


class UpdateStateFormat(UnsupportedError):
    code = "UPDATE-STATE-FORMAT"
    remediation = (
        "The version named cannot read this machine's state (its bundle.json declares an older state format than "
        "the version that runs here wrote), so nothing was switched: the machine runs on, pinned by the server to its "
        "version. Name a version of that state format or newer (`mobility-server pin HOST_ID --to VERSION`), or "
        "`mobility-server unpin` it; an older format needs a fresh install (uninstall, install, configure)."
    )


# Printed by the static launchers of the frozen programs (packaging/launcher/), not raised in Python: catalogued here
# so that their IDs and remediations have one home (tests/integration/test_packaging_*.py compare what they print).


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


# Replication on the source machine (agent/replication/, docs/replication.md) ---------------------------------------


class ProcessServerUnreachable(TemporaryError):
    code = "REPL-UNREACHABLE"
    remediation = (
        "The process server cannot be reached: check that `mobility-server serve` runs (its replication port too) "
        "and the network between them; the agent keeps tracking changes and catches up when it is back."
    )


class ReplicaLost(RemoteStateError):
    code = "REPL-REPLICA-LOST"
    remediation = (
        "The process server no longer holds what it acknowledged (its store was restored or replaced): the agent "
        "resynchronises the disk by checksums; check the process server's storage if it happens again."
    )


class DiskNotFound(LocalSystemError):
    code = "REPL-DISK-NOT-FOUND"
    remediation = (
        "The protected disk is not a block device on this machine: check the name given to `mobility-server "
        "protect --disk` (lsblk lists the disks) and protect the right one."
    )


class DiskUnsupported(UnsupportedError):
    code = "REPL-DISK-UNSUPPORTED"
    remediation = (
        "Protect the whole disk that holds it (lsblk shows the parents): partitions, device-mapper and md devices "
        "and bio-based drivers are not tracked on their own."
    )


class TracingUnavailable(UnsupportedError):
    code = "REPL-TRACING-UNAVAILABLE"
    remediation = (
        "The kernel's block tracepoints are needed: a kernel with CONFIG_FTRACE and tracefs (or debugfs) that root "
        "can mount; check `ls /sys/kernel/tracing/events/block` (mount -t tracefs nodev /sys/kernel/tracing)."
    )


class EventsLost(TemporaryError):
    """Not raised: the ID a disk in RESYNC_REQUIRED carries when the kernel dropped trace events."""

    code = "REPL-EVENTS-LOST"
    remediation = (
        "The kernel's trace buffer overflowed under a write burst, so some writes were not seen: the agent "
        "resynchronises by checksums by itself; raise replication_trace_buffer_kb if it happens often."
    )


class TraceUnparsable(TemporaryError):
    """Not raised: the ID a disk in RESYNC_REQUIRED carries when the tracer read lines it does not understand."""

    code = "REPL-TRACE-UNPARSABLE"
    remediation = (
        "The kernel's trace output has a format this agent does not read (the message quotes a line), so writes "
        "may have gone unseen: the agent resynchronises by checksums; if it repeats, report the kernel version and "
        "the line (mobility diagnostics)."
    )


class InternalError(LocalSystemError):
    """Not raised: the ID a disk (or a point) carries when a replication thread met an unexpected exception."""

    code = "REPL-INTERNAL"
    remediation = (
        "A replication thread failed unexpectedly (a defect; the message names the exception): the agent restarted "
        "it and resynchronises the disk by checksums; report it with `mobility diagnostics` (the log has the trace)."
    )


class ThawFailed(LocalSystemError):
    code = "REPL-THAW-FAILED"
    remediation = (
        "A filesystem the agent froze for a point could not be thawed (the message names it): thaw it by hand "
        "(fsfreeze --unfreeze MOUNTPOINT); writes to it block until then. Report it with `mobility diagnostics`."
    )


class FreezeFailed(LocalSystemError):
    code = "REPL-FREEZE-FAILED"
    remediation = (
        "A filesystem on a protected disk could not be frozen or stayed frozen too long (the message names it): "
        "check that it supports FIFREEZE (ext4, XFS, btrfs) and is not frozen by another tool; the next point retries."
    )


class PointFailed(TemporaryError):
    code = "REPL-POINT-FAILED"
    remediation = (
        "The recovery point could not be cut (the message says why: a disk not yet in CONTINUOUS, the process "
        "server away, a freeze that timed out); the next interval tries again, or run `mobility point` later."
    )


class DaemonNotRunning(TemporaryError):
    code = "DAEMON-NOT-RUNNING"
    remediation = "Start the agent's daemon (systemctl start mobility), then run the command again."


class RecoveryCheckFailed(LocalSystemError):
    code = "RECOVERY-CHECK-FAILED"
    remediation = (
        "A recovery check found this failed-over machine not working (the report names each check and ends with its "
        "output): the point's workload did not recover; try an older point, and look at the source's workload."
    )


class NotAFailover(UsageError):
    code = "RECOVERY-NOT-A-FAILOVER"
    remediation = (
        "Recovery checks run in a failed-over copy of the machine (test-failover --boot runs them): they start "
        "services and may change them (PostgreSQL gets the amcheck extension). To run them here anyway, add --here."
    )


class FailoverTestSilent(LocalSystemError):
    code = "FAILOVER-TEST-SILENT"
    remediation = (
        "This machine is a test failover (its hypervisor's SMBIOS string or /etc/mobility/failover says so): nothing "
        "of a test reaches the server, so it is not registered. After a real failover the machine is told "
        "mobility-failover:<point> instead, and registers as a machine of its own (docs/replication.md)."
    )
