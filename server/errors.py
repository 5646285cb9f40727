"""Errors of the configuration server; each carries the HTTP status it is answered with."""

from __future__ import annotations

from typing import ClassVar

from agent.shared.errors import (
    LocalSystemError,
    RemoteStateError,
    TemporaryError,
    TransportError,
    UnsupportedError,
    UsageError,
    VerificationError,
)


class ApiError(RemoteStateError):
    """An error answered over HTTP as ``{"error": {"code", "message", "fix"}}``; ``retry_after`` (seconds) becomes
    the Retry-After header of a 429 or 503."""

    status: ClassVar[int] = 400

    def __init__(self, message: str, *, fix: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, fix=fix)
        self.retry_after = retry_after


class BadRequest(ApiError):
    code = "BAD-REQUEST"
    remediation = "Send a JSON object with the fields the API documents (agent and server versions must match)."


class BodyTooLarge(ApiError):
    code = "BODY-TOO-LARGE"
    status = 413
    remediation = "Requests to the API are small JSON documents; send less than 64 KiB."


class NonceInvalid(ApiError):
    code = "ENROL-NONCE-INVALID"
    status = 401
    remediation = "Ask for a fresh nonce and enrol again; each nonce is single-use and expires after 5 minutes."


class BadProof(ApiError):
    code = "ENROL-BAD-PROOF"
    status = 401
    remediation = "Use the current passphrase (`mobility-server passphrase show` on the server) or a valid token."


class TokenExpired(ApiError):
    code = "ENROL-TOKEN-EXPIRED"
    status = 401
    remediation = "Create a new token with `mobility-server token create --ttl ...`."


class TokenUsedUp(ApiError):
    code = "ENROL-TOKEN-USED-UP"
    status = 401
    remediation = "The token reached its use count; create a new one with `mobility-server token create --uses N`."


class RateLimited(ApiError):
    code = "ENROL-RATE-LIMITED"
    status = 429
    remediation = "Too many failed proofs from this address; wait for Retry-After seconds, then use the right secret."


class CsrInvalid(ApiError):
    code = "CSR-INVALID"
    remediation = "Send a PEM certificate request with an EC P-256 key, signed by that key."


class HostMismatch(ApiError):
    code = "HOST-ID-MISMATCH"
    status = 403
    remediation = "A machine can act only for its own host ID (its certificate's CN); use that machine's identity."


class ClientCertRequired(ApiError):
    code = "CLIENT-CERT-REQUIRED"
    status = 401
    remediation = "Register the machine first (`mobility configure`); this call needs its client certificate."


class UnknownMachine(ApiError):
    code = "MACHINE-UNKNOWN"
    status = 404
    remediation = "The machine is not registered (or was removed); run `mobility configure` again."


class NotFound(ApiError):
    code = "NOT-FOUND"
    status = 404
    remediation = "Check the URL: the API lives under /v1."


class MethodNotAllowed(ApiError):
    code = "METHOD-NOT-ALLOWED"
    status = 405
    remediation = "Use the HTTP method the API documents for this path (GET for reads, POST for the rest)."


class JobNotOwned(ApiError):
    code = "JOB-NOT-OWNED"
    status = 403
    remediation = (
        "A machine may report only on its own jobs (or the push job created for it); report under a new job ID."
    )


class CertRevoked(ApiError):
    code = "CERT-REVOKED"
    status = 403
    remediation = (
        "The server's operator revoked this machine (`mobility-server machines revoke`); if it should be protected "
        "again, enrol it anew with `mobility configure` (it gets a new host ID)."
    )


class CertSuperseded(ApiError):
    code = "CERT-SUPERSEDED"
    status = 403
    remediation = (
        "A newer certificate was issued for this host ID (a renewal, or a copy of this machine enrolled again): this "
        "copy is stale. Run `mobility configure` on it to enrol it as the machine it is."
    )


class ServerBusy(ApiError):
    code = "SERVER-BUSY"
    status = 503
    remediation = "The server is at capacity (a boot storm?); agents retry by themselves after Retry-After seconds."


class HeadersTooLarge(ApiError):
    code = "HEADERS-TOO-LARGE"
    status = 431
    remediation = "Send the API's few short headers; a request line or header is limited to 8 KiB."


class RequestTimeout(ApiError):
    code = "REQUEST-TIMEOUT"
    status = 408
    remediation = "Send the whole request at once: its headers and body must arrive within 10 seconds."


class ServerInternal(ApiError):
    code = "SERVER-INTERNAL"
    status = 500
    remediation = "The server hit an unexpected error (its log has the details); retry, and report it if it persists."


class DatabaseUnavailable(ApiError):
    code = "DB-UNAVAILABLE"
    status = 503
    remediation = (
        "The server's database cannot be written (disk full, read-only or locked): free space on the data "
        "directory's filesystem, then retry; nothing of the failed request was kept."
    )


class DatabaseMissing(LocalSystemError):
    code = "DB-MISSING"
    remediation = (
        "The server's database is gone (mobility.db deleted, or an empty PostgreSQL database): restore it from a "
        "backup (stop the server first), or start with `serve --new-database` to begin with no machines (every agent "
        "must then enrol again)."
    )


class DatabaseSchemaOld(LocalSystemError):
    code = "DB-SCHEMA-OLD"
    remediation = (
        "The database was made by an older server: stop every instance, back it up, run `mobility-server upgrade` "
        "once, then start the instances again."
    )


class DatabaseSchemaNewer(LocalSystemError):
    code = "DB-SCHEMA-NEWER"
    remediation = "A newer server has upgraded this database: run that version of mobility-server on every instance."


class DatabaseNotEmpty(UsageError):
    code = "DB-NOT-EMPTY"
    remediation = (
        "`init` makes a new server, and this database belongs to another one: give `init --database` an empty "
        "database (createdb NAME), or use the existing server's data directory."
    )


class MachineNotFound(UsageError):
    code = "MACHINE-NOT-FOUND"
    remediation = (
        "Give the host ID as `mobility-server machines` lists it (where a command takes --machine, a hostname that "
        "names one machine also does)."
    )


class DatabaseUrlInvalid(UsageError):
    code = "DB-URL-INVALID"
    remediation = (
        "Give --database postgresql://USER@HOST[:PORT]/NAME (the password through PGPASSWORD, PGPASSFILE or "
        "~/.pgpass, never in the URL) or sqlite:///PATH."
    )


class DataDirInitialised(UsageError):
    code = "DATA-DIR-INITIALISED"
    remediation = "The directory already holds a server; use it as it is, or pass --data an empty directory."


class DataDirNotInitialised(UsageError):
    code = "DATA-DIR-NOT-INITIALISED"
    remediation = "Run `mobility-server init --data DIR` first, or pass the --data of an initialised server."


class DataDirPermissions(LocalSystemError):
    code = "DATA-DIR-PERMISSIONS"
    remediation = "Make the data directory and its keys private to the server's user: chmod 700 DIR; chmod 600 keys."


class DatabaseCorrupt(LocalSystemError):
    code = "DB-CORRUPT"
    remediation = "Restore mobility.db from a backup (stop the server first), or move it aside to start empty."


class ListenFailed(LocalSystemError):
    code = "LISTEN-FAILED"
    remediation = "Choose another --listen HOST:PORT, or stop whatever holds the port (ss -ltnp)."


class BadDuration(UsageError):
    code = "BAD-DURATION"
    remediation = "Give durations as a number and a unit: 30m, 12h, 7d."


# The operator's view: operators, the dashboard and its changes (server/database/operators.py, server/ui/) -------------


class OperatorInvalid(UsageError):
    code = "OPERATOR-INVALID"
    remediation = "Give an operator name of 1 to 64 lowercase letters, digits, '.', '_' and '-' (e.g. alice)."


class OperatorExists(UsageError):
    code = "OPERATOR-EXISTS"
    remediation = (
        "An operator of that name exists: pick another name, or `mobility-server operator remove NAME` first "
        "(its token and sessions stop working)."
    )


class OperatorNotFound(UsageError):
    code = "OPERATOR-NOT-FOUND"
    remediation = (
        "`mobility-server operator list` shows the operators; add one with `mobility-server operator add NAME`."
    )


class UiLoginRequired(ApiError):
    code = "UI-LOGIN-REQUIRED"
    status = 401
    remediation = (
        "Log in with an operator token (`mobility-server operator add NAME` makes one) or an operator client "
        "certificate; a session ends after `serve --ui-session` (default 12h)."
    )


class UiLoginFailed(ApiError):
    code = "UI-LOGIN-FAILED"
    status = 401
    remediation = (
        "The token is not an operator's (or its operator was removed): give the token `mobility-server operator "
        "add` printed, or add the operator again for a new one."
    )


class UiLoginLimited(ApiError):
    code = "UI-LOGIN-LIMITED"
    status = 429
    remediation = "Too many failed logins from this address: wait for Retry-After seconds, then use a valid token."


class UiCsrfRefused(ApiError):
    code = "UI-CSRF-REFUSED"
    status = 403
    remediation = (
        "Changes are accepted only from the dashboard's own pages (with the page's CSRF token, from the same "
        "origin): reload the page and use its buttons; a script uses `Authorization: Bearer TOKEN` instead."
    )


class UiHostRefused(ApiError):
    code = "UI-HOST-REFUSED"
    status = 403
    remediation = (
        "The loopback dashboard answers only requests addressed to a loopback name (127.0.0.1, [::1], localhost): "
        "open it by that address (or serve it elsewhere with --ui-listen and log in)."
    )


class UiNoStore(ApiError):
    code = "UI-NO-STORE"
    status = 409
    remediation = (
        "This instance holds no chunk store: start the test failover from the dashboard of the instance that runs "
        "the process server (`serve --role process` or `all`), or with `mobility-server test-failover` there."
    )


class TestFailoverRunning(ApiError):
    __test__ = False  # not a pytest class
    code = "TEST-FAILOVER-RUNNING"
    status = 409
    remediation = (
        "A test failover started from this dashboard is still running: wait for its result, then start another."
    )


# Push install over SSH (server/push/) ------------------------------------------------------------------------


class PushTargetInvalid(UsageError):
    code = "PUSH-TARGET-INVALID"
    remediation = "Give hosts as HOST, HOST:PORT or [IPv6]:PORT, on the command line or one per line in --hosts-file."


class PushCredentialsInvalid(UsageError):
    code = "PUSH-CREDENTIALS-INVALID"
    remediation = (
        "Give --key an unencrypted OpenSSH or PEM private key file, or --password-file a root-only (0600) file "
        "holding the password; passwords are never taken from the command line."
    )


class PushNoBundle(UsageError):
    code = "PUSH-NO-BUNDLE"
    remediation = (
        "Publish a bundle for the host's OS tag first: `mobility-server repo add Mobility_UA_..._<TAG>-64_...`."
    )


class PushNameUnresolved(TemporaryError):
    code = "PUSH-NAME-UNRESOLVED"
    remediation = "Check the host name (DNS, /etc/hosts on the server) or give the host's IP address."


class PushConnectRefused(TemporaryError):
    code = "PUSH-CONNECT-REFUSED"
    remediation = (
        "Nothing listens for SSH at that address and port: start sshd on the host (systemctl start ssh), "
        "open port 22 in its firewall, or give the right port with HOST:PORT."
    )


class PushConnectTimeout(TemporaryError):
    code = "PUSH-CONNECT-TIMEOUT"
    remediation = (
        "The host did not answer in time: check that it is up, that a firewall on the way lets the server "
        "reach its SSH port, and that sshd is not overloaded; or raise --timeout."
    )


class PushUnreachable(TemporaryError):
    code = "PUSH-UNREACHABLE"
    remediation = "The server has no route to the host: check the address, the network and the routes between them."


class PushHostKeyUnknown(RemoteStateError):
    code = "PUSH-HOST-KEY-UNKNOWN"
    remediation = (
        "Check the host key fingerprint in the message against the host (ssh-keygen -lf "
        "/etc/ssh/ssh_host_ed25519_key.pub), then push again with --accept-new-host-keys to record it."
    )


class PushHostKeyMismatch(RemoteStateError):
    code = "PUSH-HOST-KEY-MISMATCH"
    remediation = (
        "The host presented a different key than the one recorded in the server's known_hosts: the host was "
        "reinstalled, or someone is in the middle. Verify the new key on the host, then remove the old line "
        "from DATA/known_hosts and push with --accept-new-host-keys."
    )


class PushAuthFailed(RemoteStateError):
    code = "PUSH-AUTH-FAILED"
    remediation = (
        "The host refused the credentials: put the key's public half in the user's ~/.ssh/authorized_keys, "
        "or check the password file; for root with a password, sshd needs PermitRootLogin yes."
    )


class PushSshFailed(TransportError):
    code = "PUSH-SSH-FAILED"
    remediation = "The SSH session broke off; check the host's sshd log (journalctl -u ssh) and push again."


class PushNotRoot(RemoteStateError):
    code = "PUSH-NOT-ROOT"
    remediation = "Push as root (--user root): installing the agent needs root on the host."


class PushNoSftp(RemoteStateError):
    code = "PUSH-NO-SFTP"
    remediation = (
        "Enable the SFTP subsystem in the host's sshd: `Subsystem sftp /usr/lib/openssh/sftp-server` (or "
        "`internal-sftp`) in /etc/ssh/sshd_config, then reload sshd."
    )


class PushLowDiskSpace(UnsupportedError):
    code = "PUSH-LOW-DISK-SPACE"
    remediation = "Free at least 100 MB on the host's filesystem named in the message (or grow it), then push again."


class PushInstallFailed(RemoteStateError):
    code = "PUSH-INSTALL-FAILED"
    remediation = (
        "Read the tail of the host's /var/log/mobility/install.log in the message (the whole log is kept in "
        "DATA/push-logs/), fix the cause it names, then push again."
    )


class PushInterrupted(TemporaryError):
    code = "PUSH-INTERRUPTED"
    remediation = "The push that ran this job stopped before it finished (killed, or the server went down); push again."


# The installer repository on the server's disk (server/releases/repository.py) --------------------------------------


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


class RepoWriteFailed(LocalSystemError):
    code = "REPO-WRITE-FAILED"
    remediation = (
        "Free space on the filesystem that holds the server's data directory, or make it writable again (mount, "
        "permissions, disk errors in dmesg), then run the command again; the repository keeps its last complete "
        "publication."
    )


# Rollouts and pins (server/releases/rollouts.py, docs/updates.md) -----------------------------------------------------


class RolloutRunning(UsageError):
    code = "ROLLOUT-RUNNING"
    remediation = (
        "One rollout runs at a time: follow it with `mobility-server updates`, or stop it with "
        "`mobility-server update --halt`, then start the new one."
    )


class RolloutNotRunning(UsageError):
    code = "ROLLOUT-NOT-RUNNING"
    remediation = "There is no running rollout to halt; `mobility-server updates` lists the rollouts and their states."


class RolloutNoBundle(UsageError):
    code = "ROLLOUT-NO-BUNDLE"
    remediation = (
        "Publish that version's bundle for every OS tag named (`mobility-server repo add FILE`, or drop it into the "
        "repository and run `mobility-server repo rescan`), then start the rollout or the pin again."
    )


class RolloutNoMachines(UsageError):
    code = "ROLLOUT-NO-MACHINES"
    remediation = (
        "Select registered machines: --all, --os-tag TAG, or --machines with host IDs from `mobility-server machines`."
    )


class RolloutDowngrade(UsageError):
    code = "ROLLOUT-DOWNGRADE"
    remediation = (
        "Versions move forward: roll out a version at least as new as the machines run, leave those machines out "
        "(--machines, --os-tag), or move them back explicitly with `mobility-server pin HOST_ID --to VERSION` "
        "(or start the rollout with --allow-downgrade). A machine refuses a version that cannot read its state "
        "(UPDATE-STATE-FORMAT) either way."
    )


class RolloutHalted(RemoteStateError):
    """Not raised: the error ID of the upgrade job of a machine whose rollout halted before it began."""

    code = "ROLLOUT-HALTED"
    remediation = (
        "Nothing changed on this machine: its rollout halted after too many failures elsewhere. See "
        "`mobility-server updates` for the failing machines; start a new rollout once the version is fixed."
    )


class UpdateTimedOut(RemoteStateError):
    """Not raised: the error ID of an upgrade job the machine did not finish within the rollout's --wave-timeout."""

    code = "UPDATE-TIMED-OUT"
    remediation = (
        "The machine did not finish its upgrade (and show the new version, online and not critical) within the "
        "rollout's --wave-timeout: check that it is online (`mobility-server machines`) and its "
        "/var/log/mobility/install.log; the server pinned it to the version it runs: `mobility-server unpin` it once "
        "it is fixed, and it takes part in the next rollout that includes it."
    )


# Replication: the process server's stream, chunk store, points and failover (server/process/) ------------------


class ReplicationProtocol(TransportError):
    code = "REPL-PROTOCOL"
    remediation = (
        "The peer sent something that is not the replication protocol (or a version this side does not speak): "
        "check that agent and server run matching versions; the stream restarts by itself."
    )


class NotProtected(RemoteStateError):
    code = "REPL-NOT-PROTECTED"
    remediation = "Protect the disk first: `mobility-server protect --machine HOST --disk /dev/X` (or --all-disks)."


class ChunkCorrupt(VerificationError):
    code = "REPL-CHUNK-CORRUPT"
    remediation = (
        "A chunk did not match its hash on arrival and was not stored; the agent resends it. If it repeats, check "
        "the source machine's memory and disk (dmesg) and the network path."
    )


class PointMismatch(VerificationError):
    code = "REPL-POINT-MISMATCH"
    remediation = (
        "The replica's root hash differs from the one the source computed: the point was refused and the agent "
        "resynchronises the disk by checksums; nothing needs to be done unless it repeats (then report it)."
    )


class PointIdTaken(RemoteStateError):
    code = "REPL-POINT-ID-TAKEN"
    remediation = (
        "A point ID is used once: another machine's point has this ID, or this point was closed on the disk before "
        "with other contents. The point was refused and nothing of any other point changed; the agent cuts its next "
        "point under a new ID. If it repeats, check that the machine runs a genuine agent (`mobility-server "
        "machines`, and revoke it if not)."
    )


class DiskTooLarge(UnsupportedError):
    code = "REPL-DISK-TOO-LARGE"
    remediation = (
        "The process server keeps at most 1,048,576 chunks per disk (16 TiB in chunks of 16 MiB, as the agent cuts "
        "large disks): protect disks up to that size, or split the data over several disks."
    )


class StoreFull(TemporaryError):
    code = "PS-STORE-FULL"
    remediation = (
        "The process server's store is at its reserve of free space and refuses new data: free space on the "
        "filesystem of DATA/process (or lower the retention of the policies), and replication resumes by itself."
    )


class StoreWriteFailed(LocalSystemError):
    code = "PS-STORE-WRITE-FAILED"
    remediation = (
        "The process server could not write or flush its chunk store (I/O error, read-only or full filesystem): "
        "check dmesg and the filesystem of DATA/process; nothing unacknowledged was kept and agents resend it."
    )


class StoreBusy(LocalSystemError):
    code = "PS-STORE-BUSY"
    remediation = (
        "Another process server writes this chunk store (DATA/process): run one process server per store, e.g. "
        "`serve --role process` on one host and `serve --role api --process-address HOST:PORT` on the others."
    )


class StoreDamaged(LocalSystemError):
    code = "PS-STORE-DAMAGED"
    remediation = (
        "The process server's chunk index (DATA/process/index.db) is unreadable: stop the server and run "
        "`mobility-server store repair`, which rebuilds it from the packs, manifests and point records."
    )


class IndexMissing(LocalSystemError):
    code = "PS-INDEX-MISSING"
    remediation = (
        "The chunk store's index (DATA/process/index.db) is gone while its packs and points are there: the server "
        "will not start an empty index over them. Run `mobility-server store repair` to rebuild it, then serve."
    )


class RepairPartial(LocalSystemError):
    code = "PS-REPAIR-PARTIAL"
    remediation = (
        "The index was rebuilt, but the points listed were not restored: their records or data are damaged or "
        "missing (a point the server was closing when it was killed was never acknowledged and is listed too). "
        "Their records are kept: restore the damaged packs or manifests from a backup and run `store repair` again."
    )


class ProtectDiskInvalid(UsageError):
    code = "PROTECT-DISK-INVALID"
    remediation = "Give whole disks as /dev paths (--disk /dev/sdb, repeatable) or --all-disks, not both."


class PolicyNotFound(UsageError):
    code = "POLICY-NOT-FOUND"
    remediation = "Create the policy first (`mobility-server policy set NAME ...`) or use `default`."


class PolicyInvalid(UsageError):
    code = "POLICY-INVALID"
    remediation = (
        "Give a policy name of lowercase letters, digits, - and _, durations like 30s, 5m or 1h (1 s to 7 days), a "
        "bandwidth like 50M (bytes per second, at most 1T, 0 for no cap) and a retention of 1 to 10000 points."
    )


class PointNotFound(UsageError):
    code = "POINT-NOT-FOUND"
    remediation = "Pick a point from `mobility-server points --machine HOST` (or `latest`)."


class PointCorrupt(VerificationError):
    code = "POINT-CORRUPT"
    remediation = (
        "The point's data in the store does not match its root hash (the message names the disk and chunk): "
        "fail over to another point, check the process server's disk (dmesg, SMART), and run `verify` on the others."
    )


class FailoverOutExists(UsageError):
    code = "FAILOVER-OUT-EXISTS"
    remediation = "Give --out a new or empty directory: failover never overwrites disk images."


class FailoverInterrupted(TemporaryError):
    code = "FAILOVER-INTERRUPTED"
    remediation = (
        "The command was stopped (SIGTERM, Ctrl-C or a closed terminal) and released what it had made: no disk "
        "image and no VM of it is left. Run it again."
    )


class TestFailoverFailed(VerificationError):
    __test__ = False  # not a pytest class
    code = "TEST-FAILOVER-FAILED"
    remediation = (
        "The point did not pass (the report names the step: a filesystem's journal replay, fsck or mount; with "
        "--boot the boot to multi-user.target or one of the machine's own checks, with its output): try an older "
        "point, run `mobility-server verify --point ID` on the one that failed, and read the console log a --keep "
        "run leaves in its scratch area."
    )


class FailoverToolMissing(UnsupportedError):
    code = "FAILOVER-TOOL-MISSING"
    remediation = (
        "Install what failover and test-failover run: QEMU (qemu-system-x86, qemu-utils), libguestfs's guestfish "
        "and its XFS support (guestfish, libguestfs-xfs) with a kernel for its appliance (linux-image-amd64), and "
        "util-linux and coreutils (unshare, setpriv, stdbuf)."
    )


class FailoverNotBootable(VerificationError):
    code = "FAILOVER-NOT-BOOTABLE"
    remediation = (
        "test-failover --boot found no root filesystem of a systemd machine in the point (one with /etc/os-release, "
        "/etc/fstab and /etc/systemd/system): protect the disk the machine boots from with its data disks, or test "
        "a point of data disks with test-failover alone (no --boot)."
    )


class FailoverVmBusy(TemporaryError):
    code = "FAILOVER-VM-BUSY"
    remediation = (
        "Every VM slot of this machine stayed taken (test failovers, failover marks and the VM lab run at most two "
        "VMs at once): wait for the others to end, or give a longer --wait."
    )
