from __future__ import annotations

from agent.daemon.config import AgentConfig
from agent.daemon.health import DiskSample, Health, ProcessSample, ServerSample, health_checks, overall
from agent.daemon.health.self_checks import CertificateDays, ClockSkew, MemoryBudget, ServerReachable, StateDisk
from agent.lifecycle.check_report import Report, Status, run_checks

MIB = 1024 * 1024
CFG = AgentConfig()
NOW = 1_800_000_000.0


def proc(rss_mib: float, cpu: float = 1.0, threads: int = 2, files: int = 8) -> ProcessSample:
    return ProcessSample(int(rss_mib * MIB), cpu, threads, files, 4096 * MIB)


def test_memory_budget_levels_and_share_of_the_machine() -> None:
    assert MemoryBudget(proc(30), CFG).run().status is Status.PASS
    warn = MemoryBudget(proc(55), CFG).run()
    assert warn.status is Status.WARN and "1.34 % of the machine's memory" in warn.message
    assert MemoryBudget(proc(64), CFG).run().status is Status.FAIL
    assert MemoryBudget(None, CFG).run().status is Status.UNKNOWN


def test_server_reachability_warns_then_fails() -> None:
    assert ServerReachable(ServerSample(), CFG, NOW).run().status is Status.UNKNOWN
    ok = ServerReachable(ServerSample(last_ok=NOW - 5, rtt_ms=3.2), CFG, NOW).run()
    assert ok.status is Status.PASS and ok.value == "3.2 ms"
    warn = ServerReachable(ServerSample(unreachable_since=NOW - 60, last_error="SERVER-UNREACHABLE"), CFG, NOW).run()
    assert warn.status is Status.WARN and "server unreachable since" in warn.message
    assert ServerReachable(ServerSample(unreachable_since=NOW - 601), CFG, NOW).run().status is Status.FAIL


def test_clock_skew_and_certificate_days() -> None:
    assert ClockSkew(ServerSample(skew_seconds=-2.0), CFG).run().status is Status.PASS
    assert ClockSkew(ServerSample(skew_seconds=90.0), CFG).run().status is Status.WARN
    assert ClockSkew(ServerSample(skew_seconds=-400.0), CFG).run().status is Status.FAIL
    assert CertificateDays(NOW + 60 * 86400, CFG, NOW).run().status is Status.PASS
    assert CertificateDays(NOW + 20 * 86400, CFG, NOW).run().status is Status.WARN
    assert CertificateDays(NOW - 1, CFG, NOW).run().status is Status.FAIL
    assert CertificateDays(None, CFG, NOW).run().status is Status.FAIL


def test_disk_levels() -> None:
    assert StateDisk(DiskSample(10_000 * MIB, MIB), CFG).run().status is Status.PASS
    assert StateDisk(DiskSample(100 * MIB, MIB), CFG).run().status is Status.WARN
    assert StateDisk(DiskSample(10_000 * MIB, 500 * MIB), CFG).run().status is Status.WARN
    assert StateDisk(DiskSample(10 * MIB, MIB), CFG).run().status is Status.FAIL


def test_overall_follows_the_monitoring_plugin_convention() -> None:
    def report(*statuses: Status) -> Report:
        from agent.lifecycle.check_report import Result

        return Report(tuple(Result(f"X{i}", s, "") for i, s in enumerate(statuses)))

    assert overall(report(Status.PASS)) is Health.HEALTHY
    assert overall(report(Status.PASS, Status.UNKNOWN)) is Health.UNKNOWN
    assert overall(report(Status.UNKNOWN, Status.WARN)) is Health.WARNING
    assert overall(report(Status.WARN, Status.FAIL)) is Health.CRITICAL


def test_daemon_not_running_is_critical() -> None:
    checks = health_checks(
        CFG, NOW, None, ServerSample(last_ok=NOW), DiskSample(10_000 * MIB, 0), NOW + 90 * 86400, True
    )
    report = run_checks(checks)
    assert overall(report) is Health.CRITICAL
    assert report.results[0].message == "daemon not running"


def test_replication_stalled_is_critical_and_lag_past_the_rpo_warns() -> None:
    from agent.daemon.health.self_checks import Replication

    def disk(state: str, lag: float | None = 1.0, **more: object) -> dict[str, object]:
        return {"disk": "/dev/sdb", "state": state, "lag_seconds": lag, **more}

    now = 10_000.0
    policy = {"rpo_seconds": 900.0, "interval_seconds": 300.0, "started": now - 60}
    assert Replication(None, now).run().status is Status.PASS
    stalled = Replication({"disks": [disk("STALLED", error="PS-STORE-FULL", detail="full")], **policy}, now).run()
    assert (stalled.status, "PS-STORE-FULL" in stalled.message) == (Status.FAIL, True)
    assert Replication({"disks": [disk("RESYNCING", None)], **policy}, now).run().status is Status.WARN
    assert Replication({"disks": [disk("CONTINUOUS", 1000.0)], **policy}, now).run().status is Status.WARN
    old_point = Replication({"disks": [disk("CONTINUOUS")], **policy, "last_point": now - 3600}, now).run()
    assert old_point.status is Status.WARN and "no recovery point for 60 min" in old_point.message
    fine = Replication({"disks": [disk("CONTINUOUS")], **policy, "last_point": now - 100}, now).run()
    assert fine.status is Status.PASS
