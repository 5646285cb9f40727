"""Errors of replication on the source machine (agent/replication/); catalogued in docs/errors.md."""

from __future__ import annotations

from agent.errors import LocalSystemError, RemoteStateError, TemporaryError, UnsupportedError


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
