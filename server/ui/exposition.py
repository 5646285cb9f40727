"""The fleet snapshot in the Prometheus text format (version 0.0.4), for /metrics.

Written line by line here rather than through prometheus_client's collectors: at 10,000 machines the fleet is some
60,000 samples (60,076, 6.0 MB, in docs/monitoring.md's run of bench/dashboard.py), which its generic writer takes
about half a second for. The text is made once per snapshot, when first asked for, and kept with it; a scrape then
costs a copy (the first scrape, which writes it, took 59 to 192 ms in those runs, the next ones 8 ms). Every name and
label is documented in docs/monitoring.md; tests/server/ui/test_site.py (``test_metrics_parse_and_count_the_fleet``)
and tests/server/ui/test_monitoring_docs.py parse the text with prometheus_client's own parser. Per-machine series
carry only ``host_id``; ``mobility_machine_info`` joins it to the hostname, OS tag and version, as Prometheus'
convention for labels that would otherwise repeat on every series."""

from __future__ import annotations

import math
from collections.abc import Iterable

from server.ui.snapshot import MACHINE_STATES, Snapshot

LATEST_ROLLOUTS = 5


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() or abs(v) >= 1e15 else str(int(v))


class _Text:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, help_text: str, kind: str = "gauge") -> None:
        self.parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

    def sample(self, name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels)
        self.parts.append(f"{name}{{{inner}}} {_value(value)}\n" if inner else f"{name} {_value(value)}\n")

    def bytes(self) -> bytes:
        return "".join(self.parts).encode()


def fleet_text(snap: Snapshot) -> bytes:
    """The fleet's figures as of the snapshot (``mobility_snapshot_timestamp_seconds`` says when)."""
    t = _Text()
    t.family("mobility_snapshot_timestamp_seconds", "When the fleet figures below were read (Unix time).")
    t.sample("mobility_snapshot_timestamp_seconds", (), snap.taken_at)
    t.family("mobility_snapshot_build_seconds", "How long reading the fleet figures took.")
    t.sample("mobility_snapshot_build_seconds", (), snap.build_seconds)

    t.family("mobility_machines", "Machines by state (online, offline, revoked, never seen) and reported health.")
    by: dict[tuple[str, str], int] = {}
    for m in snap.machines:
        by[(m.state, m.health)] = by.get((m.state, m.health), 0) + 1
    for state in MACHINE_STATES:
        for health in ("healthy", "warning", "critical", "unknown"):
            t.sample("mobility_machines", (("state", state), ("health", health)), by.get((state, health), 0))
    t.family("mobility_machines_by_os_tag", "Machines by OS tag.")
    for tag, n in sorted(snap.counts.get("os_tag", {}).items()):
        t.sample("mobility_machines_by_os_tag", (("os_tag", tag),), n)
    t.family("mobility_machines_by_agent_version", "Machines by the agent version they run.")
    for version, n in sorted(snap.counts.get("version", {}).items()):
        t.sample("mobility_machines_by_agent_version", (("version", version),), n)
    t.family("mobility_machines_by_protection", "Machines by protection state (unprotected, waiting, or a disk state).")
    for state, n in sorted(snap.counts.get("protection", {}).items()):
        t.sample("mobility_machines_by_protection", (("state", state),), n)

    # The per-machine and per-disk series, a fleet's worth each: written by one f-string a line.
    machines, disks, parts = snap.machines, snap.disks, t.parts
    t.family("mobility_machine_info", "One series a machine, 1, with its hostname, OS tag and agent version.")
    parts.extend(
        f'mobility_machine_info{{host_id="{_label(m.host_id)}",hostname="{_label(m.hostname)}",'
        f'os_tag="{_label(m.os_tag)}",version="{_label(m.version)}"}} 1\n'
        for m in machines
    )
    ids = {m.host_id: _label(m.host_id) for m in machines}
    t.family("mobility_machine_up", "1 while a machine heartbeats within 3 intervals, else 0 (revoked machines: none).")
    parts.extend(
        f'mobility_machine_up{{host_id="{ids[m.host_id]}"}} {1 if m.state == "online" else 0}\n'
        for m in machines
        if m.state != "revoked"
    )
    t.family("mobility_machine_point_age_seconds", "Seconds from a machine's newest recovery point to the snapshot.")
    parts.extend(
        f'mobility_machine_point_age_seconds{{host_id="{ids[m.host_id]}"}} '
        f"{_value(max(0.0, snap.taken_at - m.newest_point))}\n"
        for m in machines
        if m.newest_point is not None
    )
    protected = [m for m in machines if m.rpo is not None]
    t.family("mobility_protection_rpo_seconds", "A protected machine's RPO target (its policy).")
    parts.extend(
        f'mobility_protection_rpo_seconds{{host_id="{ids[m.host_id]}"}} {_value(m.rpo or 0.0)}\n' for m in protected
    )
    t.family("mobility_protection_interval_seconds", "How often a protected machine cuts a point (its policy).")
    parts.extend(
        f'mobility_protection_interval_seconds{{host_id="{ids[m.host_id]}"}} {_value(m.interval or 0.0)}\n'
        for m in protected
    )

    keys = [f'host_id="{ids.get(d.host_id) or _label(d.host_id)}",disk="{_label(d.disk)}"' for d in disks]
    t.family("mobility_disk_lag_seconds", "Age of a disk's oldest change not yet on the process server (the RPO now).")
    parts.extend(
        f"mobility_disk_lag_seconds{{{k}}} {_value(d.lag_now)}\n"
        for k, d in zip(keys, disks, strict=True)
        if d.lag_now is not None
    )
    t.family("mobility_disk_throughput_bytes_per_second", "A disk's replication throughput as its machine reported.")
    parts.extend(
        f"mobility_disk_throughput_bytes_per_second{{{k}}} {_value(d.throughput)}\n"
        for k, d in zip(keys, disks, strict=True)
    )
    t.family("mobility_disk_bytes_left", "Bytes of a disk still to send (a sync or a backlog).")
    parts.extend(f"mobility_disk_bytes_left{{{k}}} {d.bytes_left}\n" for k, d in zip(keys, disks, strict=True))
    t.family("mobility_disk_state", "1 for each protected disk, labelled with its replication state.")
    parts.extend(f'mobility_disk_state{{{k},state="{_label(d.state)}"}} 1\n' for k, d in zip(keys, disks, strict=True))
    t.family("mobility_disk_rpo_breached", "1 while a disk's lag (or its silent machine's) exceeds its RPO target.")
    parts.extend(
        f"mobility_disk_rpo_breached{{{k}}} {1 if d.breach else 0}\n" for k, d in zip(keys, disks, strict=True)
    )

    if snap.store is not None:
        s = snap.store
        for name, help_text, value in (
            ("mobility_store_bytes", "Bytes the chunk store takes (its packs and index).", s.bytes),
            ("mobility_store_free_bytes", "Bytes free on the chunk store's filesystem.", s.free),
            ("mobility_store_filesystem_bytes", "Size of the chunk store's filesystem.", s.size),
            ("mobility_store_reserve_bytes", "Free space the store keeps: below it new data is refused.", s.reserve),
        ):
            t.family(name, help_text)
            t.sample(name, (), value)

    rollouts = snap.rollouts[:LATEST_ROLLOUTS]
    t.family("mobility_rollout_newest", "1 for the newest rollout, with its state: running, halted or completed.")
    if rollouts:
        newest = rollouts[0][0]
        t.sample(
            "mobility_rollout_newest",
            (("rollout_id", newest.rollout_id), ("to_version", newest.to_version), ("state", newest.state)),
            1,
        )
    t.family("mobility_rollout_machines", "Machines of the newest rollouts by their state in it.")
    for r, counts in rollouts:
        for state, n in sorted(counts.items()):
            t.sample("mobility_rollout_machines", (("rollout_id", r.rollout_id), ("state", state)), n)
    t.family("mobility_rollout_wave", "The wave a rollout has offered (0 before the first).")
    for r, _ in rollouts:
        t.sample("mobility_rollout_wave", (("rollout_id", r.rollout_id),), r.current_wave)
    t.family("mobility_rollout_waves", "How many waves a rollout has.")
    for r, _ in rollouts:
        t.sample("mobility_rollout_waves", (("rollout_id", r.rollout_id),), r.waves)
    return t.bytes()
