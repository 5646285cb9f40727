"""The daemon driven by tick(now) with a fake clock: hours of schedule in milliseconds. The link to the server is
faked here (the transport boundary); tests/integration/test_daemon.py runs the real daemon against a real server."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.daemon.config import AgentConfig
from agent.daemon.loop import Daemon, RestartRequested
from agent.daemon.sdnotify import Notifier
from agent.daemon.status import DaemonStatus
from agent.errors import ServerUnreachable
from agent.host.paths import Paths
from agent.lifecycle.identity import Registration, save_registration
from agent.shared.wire import MachineFacts

T0 = 1_800_000_000.0
# The test process's own RSS is what the daemon measures here, and it depends on what the suite loaded before:
# tests that are not about memory give it room; the memory test calibrates its budget from a measurement.
ROOMY = AgentConfig(memory_budget_mib=4096)


class FakeLink:
    def __init__(self) -> None:
        self.beats: list[tuple[float, dict[str, Any]]] = []
        self.down = False
        self.interval: float = 30.0
        self.renewals = 0
        self.update_checks = 0
        self.clock = T0
        self.update: object = None  # the heartbeat answer's "update" field (None: absent)

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise ServerUnreachable("cannot reach the configuration server: connection refused")
        self.beats.append((self.clock, body))
        answer: dict[str, Any] = {"interval": self.interval, "server_time": self.clock}
        if self.update is not None:
            answer["update"] = self.update
        return answer

    def renew(self) -> None:
        self.renewals += 1

    def newest_version(self, os_tag: str) -> str | None:
        self.update_checks += 1
        return "0.2.0"

    def close(self) -> None:
        pass


def write_cert(paths: Paths, not_before: float, days: float) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-1")])
    start = dt.datetime.fromtimestamp(not_before, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    paths.client_cert.parent.mkdir(parents=True, exist_ok=True)
    paths.client_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text("m" * 32 + "\n")  # the registration below is this machine's
    save_registration(p, Registration("host-1", MachineFacts("m" * 32), "127.0.0.1:9443", "sha256:x", "MS", "VmWare"))
    write_cert(p, T0, 90)
    p.config_dir.mkdir(parents=True, exist_ok=True)
    p.agent_config.write_text(json.dumps({"os_tag": "DEBIAN12", "version": "0.1.0"}))
    return p


def run_for(daemon: Daemon, link: FakeLink, seconds: int, start: float = T0, step: float = 1.0) -> None:
    t = start
    while t < start + seconds:
        link.clock = t
        daemon.tick(t)
        t += step


def test_six_hours_of_schedule(paths: Paths) -> None:
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 6 * 3600)
    assert len(link.beats) == 6 * 3600 // 30 - 1
    assert link.update_checks == 5
    daemon._update_thread.join(timeout=10)  # type: ignore[union-attr]
    daemon.tick(T0 + 6 * 3600)  # the last check's answer is taken on the next tick
    assert daemon.status.update_available == "0.2.0"
    assert link.renewals == 0  # a 90-day certificate is not due in six hours
    health = link.beats[-1][1]["health"]
    assert {c["id"] for c in health["checks"]} >= {"HLT-RSS", "HLT-SERVER", "HLT-CERT"}


def test_a_copy_of_a_registered_machine_never_speaks_as_it(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    """A clone of a template that was not prepped boots with the template's registration, key and certificate, and
    its daemon starts before the bootstrapper re-registers it: it must send nothing as the template (no heartbeat,
    no update check, no upgrade), until it is registered as itself."""
    (paths.root / "etc/machine-id").write_text("c" * 32 + "\n")  # a copy: another machine-id
    link = FakeLink()
    link.update = {"version": "0.2.0", "job_id": "j1", "pinned": False}
    daemon = Daemon(paths, ROOMY, link, now=T0)
    daemon.heartbeat()
    run_for(daemon, link, 3 * 3600)
    assert link.beats == [] and link.update_checks == 0
    assert daemon.copy_of == "host-1"
    assert DaemonStatus.load(paths).last_error == (  # type: ignore[union-attr]
        "a copy of host-1: waiting for the bootstrapper to register this machine"
    )
    assert sum("this machine is a copy of host-1" in r.message for r in caplog.records) == 1

    # The bootstrapper registers the copy as itself (a new host ID, this machine's facts): heartbeats resume.
    save_registration(
        paths, Registration("host-2", MachineFacts("c" * 32), "127.0.0.1:9443", "sha256:x", "MS", "VmWare")
    )
    run_for(daemon, link, 60, start=T0 + 3 * 3600)
    assert link.beats and {body["host_id"] for _, body in link.beats} == {"host-2"}
    assert daemon.copy_of is None and daemon.status.last_error is None


POINT = "0b7f1a52-3c1e-4f57-9a0e-2f1d6c7b8e90"
SOURCE = "5d9c7f3e-1b2a-4c8d-9e0f-a1b2c3d4e5f6"  # the registration below is host-1's: the mark names its host ID


def oem_string(paths: Paths, text: str) -> None:
    """What a hypervisor hands the guest as an SMBIOS type 11 string (as QEMU's -smbios type=11,value=TEXT)."""
    entry = paths.root / "sys/firmware/dmi/entries/11-0"
    entry.mkdir(parents=True)
    (entry / "raw").write_bytes(bytes([11, 5, 0x00, 0x0E, 1]) + text.encode() + b"\0\0")


def as_source(paths: Paths) -> None:
    """The registration in the failed-over image: the source's, under the host ID the mark names."""
    save_registration(paths, Registration(SOURCE, MachineFacts("m" * 32), "127.0.0.1:9443", "sha256:x", "MS", "VmWare"))


def test_a_test_failover_never_speaks_to_the_server(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    """A recovery point of the source booted by test-failover: its daemon starts with the source's registration, key
    and a certificate due for renewal, on the same facts (nothing tells it from the source but its mark). It sends
    nothing for hours: no heartbeat, no renewal (which would supersede the source's certificate), no update check; not
    even once some registration of another host appears."""
    as_source(paths)
    write_cert(paths, T0 - 80 * 86400, 90)  # two thirds of its life gone: a renewal would be due
    oem_string(paths, f"mobility-failover:v1:test:{SOURCE}:{POINT}")
    link = FakeLink()
    link.update = {"version": "0.2.0", "job_id": "j1", "pinned": False}
    daemon = Daemon(paths, ROOMY, link, now=T0)
    daemon.heartbeat()
    run_for(daemon, link, 3 * 3600)
    assert (link.beats, link.renewals, link.update_checks) == ([], 0, 0)
    why = f"a test failover of {SOURCE} at point {POINT}: nothing of a test failover reaches the server"
    assert DaemonStatus.load(paths).last_error == why  # type: ignore[union-attr]
    said = f"this machine is a test failover of {SOURCE} at point {POINT}"
    assert sum(said in r.message for r in caplog.records) == 1
    save_registration(
        paths, Registration("host-2", MachineFacts("m" * 32), "127.0.0.1:9443", "sha256:x", "MS", "VmWare")
    )
    run_for(daemon, link, 120, start=T0 + 3 * 3600)
    assert link.beats == [] and link.renewals == 0


def test_a_failover_is_silent_until_it_registers_as_itself(paths: Paths) -> None:
    """After a real failover the machine holds the source's registration until the bootstrapper registers it as a
    machine of its own: until then nothing goes out as the source (not a renewal either); then it heartbeats as itself,
    and a later boot with the hypervisor's string gone is still that machine."""
    as_source(paths)
    write_cert(paths, T0 - 80 * 86400, 90)
    oem_string(paths, f"mobility-failover:v1:failover:{SOURCE}:{POINT}")
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 3600)
    assert (link.beats, link.renewals) == ([], 0)
    save_registration(
        paths, Registration("host-3", MachineFacts("m" * 32), "127.0.0.1:9443", "sha256:x", "MS", "VmWare")
    )
    run_for(daemon, link, 60, start=T0 + 3600)
    assert link.beats and {body["host_id"] for _, body in link.beats} == {"host-3"}
    assert daemon.status.last_error is None
    for entry in (paths.root / "sys/firmware/dmi/entries/11-0").iterdir():
        entry.unlink()
    again = Daemon(paths, ROOMY, FakeLink(), now=T0 + 7200)
    assert again.failover is not None and again.registration_is_ours()


def test_a_replaced_network_card_is_still_the_same_machine(paths: Paths) -> None:
    """Only the machine-id and the DMI UUID tell a copy (as the server judges): other MACs are the same machine."""
    (paths.root / "sys/class/net/ens3/device").mkdir(parents=True)
    (paths.root / "sys/class/net/ens3/address").write_text("52:54:00:aa:bb:cc\n")
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 120)
    assert len(link.beats) == 3 and daemon.status.last_error is None


def test_server_sets_the_heartbeat_interval(paths: Paths) -> None:
    link = FakeLink()
    link.interval = 10.0
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 600)
    gaps = {round(b - a) for (a, _), (b, _) in zip(link.beats[1:], link.beats[2:], strict=False)}
    assert gaps == {10}


def test_offline_backlog_is_bounded_and_caught_up(paths: Paths) -> None:
    link = FakeLink()
    daemon = Daemon(paths, AgentConfig(memory_budget_mib=4096, backlog_max=5), link, now=T0)
    run_for(daemon, link, 100)
    link.down = True
    run_for(daemon, link, 600, start=T0 + 100)
    assert daemon.status.unreachable_since is not None
    assert len(daemon.backlog) == 5  # 20 missed heartbeats, the newest 5 kept
    daemon.check_health()
    server = next(c for c in daemon.report["checks"] if c["id"] == "HLT-SERVER")
    assert server["status"] == "WARN" and "server unreachable since" in server["message"]
    sent = len(link.beats)
    link.down = False
    run_for(daemon, link, 60, start=T0 + 700)
    assert daemon.status.unreachable_since is None and not daemon.backlog
    queued = [body for _, body in link.beats[sent:] if body.get("queued")]
    assert len(queued) == 5
    assert DaemonStatus.load(paths) is not None and DaemonStatus.load(paths).backlog == 0  # type: ignore[union-attr]


def test_certificate_renewed_after_two_thirds_of_its_life(paths: Paths) -> None:
    write_cert(paths, T0 - 61 * 86400, 90)  # 61 of 90 days gone: past two thirds
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 3601, step=10)
    assert link.renewals == 1


def test_signals_only_queue_then_reload_and_stop(paths: Paths) -> None:
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    (paths.config_dir / "mobility.conf").write_text('{"health_seconds": 5, "memory_budget_mib": 4096}')
    daemon.queue_signal(signal.SIGHUP)
    assert daemon.config.health_seconds == 60  # nothing happens inside the handler
    daemon.tick(T0 + 1)
    assert daemon.config.health_seconds == 5
    daemon.queue_signal(signal.SIGTERM)
    daemon.tick(T0 + 2)
    assert daemon.stopping


def test_memory_warning_sheds_and_past_the_budget_restarts(paths: Paths) -> None:
    link = FakeLink()
    rss = Daemon(paths, ROOMY, link, now=T0).check_health()
    rss_mib = float(next(c for c in rss["checks"] if c["id"] == "HLT-RSS")["value"].split()[0])
    config = AgentConfig(memory_budget_mib=rss_mib + 40, memory_warn_ratio=(rss_mib - 5) / (rss_mib + 40))
    daemon = Daemon(paths, config, link, now=T0)
    for t in range(5):
        daemon.backlog.append({"n": t})
    daemon.check_health()
    assert daemon.shedding and len(daemon.backlog) == 2
    update_job = [j for j in daemon.scheduler.jobs if j.job_func.func == daemon.check_update]  # type: ignore[union-attr]
    assert update_job[0].interval == 4 * 3600
    tight = AgentConfig(memory_budget_mib=rss_mib / 2)
    daemon = Daemon(paths, tight, link, now=T0)
    with pytest.raises(RestartRequested):
        daemon.check_health()
    assert link.beats[-1][1]["health"]["status"] == "critical"


def test_systemd_notifications(paths: Paths, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(2)
        link = FakeLink()
        daemon = Daemon(paths, ROOMY, link, now=T0, notifier=Notifier(sock_path))
        daemon.check_health()
        daemon.tick(T0 + 1)
        got = [sock.recv(4096).decode() for _ in range(3)]
    assert got[0].startswith("STATUS=") and got[1] == "READY=1" and got[2] == "WATCHDOG=1"


def test_prometheus_metrics_on_localhost(paths: Paths) -> None:
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = FakeLink()
    daemon = Daemon(paths, AgentConfig(memory_budget_mib=4096, metrics_port=port), link, now=T0)
    try:
        daemon.check_health()
        daemon.heartbeat()
        daemon.check_health()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        daemon.metrics.close()
    assert 'mobility_health_check_status{check="HLT-RSS"} 0.0' in body
    assert "mobility_heartbeats_total 1.0" in body
    assert "mobility_resident_memory_bytes" in body


def test_notifications_never_block_the_daemon(paths: Paths, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "deaf")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:  # bound, never read: its queue fills up
        deaf.bind(sock_path)
        notifier = Notifier(sock_path)
        start = time.monotonic()
        for _ in range(5000):
            notifier.notify(watchdog="1")
        assert time.monotonic() - start < 5


class ProtectingLink(FakeLink):
    """A server that answers with a protection setting (or a poisoned one)."""

    def __init__(self, protection: Any) -> None:
        super().__init__()
        self.protection = protection

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**super().heartbeat(body), "protection": self.protection}


PROTECTION = {
    "disks": ["/dev/nosuchdisk"],
    "all_disks": False,
    "policy": {"name": "default", "rpo_seconds": 900, "interval_seconds": 300, "bandwidth_bps": 0, "retention": 24},
    "process": {"host": None, "port": 9444},
    "paused": False,
}


def test_a_poisoned_protection_answer_changes_nothing(paths: Paths, caplog: pytest.LogCaptureFixture) -> None:
    for poisoned in ({**PROTECTION, "disks": ["/etc/shadow"]}, {**PROTECTION, "policy": "x"}, ["/dev/sdb"]):
        link = ProtectingLink(poisoned)
        daemon = Daemon(paths, ROOMY, link, now=T0)
        daemon.heartbeat()
        assert daemon.replication is None
    assert "protection settings are not valid" in caplog.text


def test_a_protected_disk_that_is_not_here_is_reported_then_protection_ends(paths: Paths) -> None:
    link = ProtectingLink(PROTECTION)
    daemon = Daemon(paths, ROOMY, link, now=T0)
    daemon.heartbeat()
    assert daemon.replication is not None
    daemon.heartbeat()
    (disk,) = link.beats[-1][1]["replication"]["disks"]
    assert (disk["disk"], disk["state"], disk["error"]) == ("/dev/nosuchdisk", "STALLED", "REPL-DISK-NOT-FOUND")
    link.protection = None
    daemon.heartbeat()
    daemon.heartbeat()
    assert link.beats[-1][1]["replication"]["disks"] == []
    daemon.replication.stop()


class _TickyProcess:
    """psutil.Process as it reads CPU: over a window of a few milliseconds the figure is whole clock ticks, e.g.
    1924.9 % (seen in the demo's first health report); over a real window it is the truth."""

    def __init__(self) -> None:
        import psutil

        self.real = psutil.Process()
        self.windows: list[float | None] = []

    def cpu_percent(self, interval: float | None = None) -> float:
        self.windows.append(interval)
        return 3.5 if interval else 1924.9

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_the_first_cpu_figure_is_measured_over_a_real_window(paths: Paths) -> None:
    process = _TickyProcess()
    daemon = Daemon(paths, ROOMY, FakeLink(), now=T0, process=process)  # type: ignore[arg-type]
    cpu = next(c for c in daemon.check_health()["checks"] if c["id"] == "HLT-CPU")
    assert (cpu["status"], cpu["value"]) == ("PASS", "3.5 %")
    again = next(c for c in daemon.check_health(measure_cpu=False)["checks"] if c["id"] == "HLT-CPU")
    assert again["value"] == "3.5 %"  # moments later: the same figure, not a new tiny window
    assert process.windows[-1] is not None and process.windows.count(None) == 1  # only the window's start


class SlowRepositoryLink(FakeLink):
    """A server that takes for ever to send repository metadata (a trickle, a stuck proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def newest_version(self, os_tag: str) -> str | None:
        self.update_checks += 1
        self.release.wait(60)
        return "0.3.0"


def test_a_slow_update_check_never_stops_heartbeats_or_the_watchdog(paths: Paths, tmp_path: Path) -> None:
    """The update check runs beside the loop: the loop keeps heartbeating and petting systemd's watchdog while the
    repository answers slowly (the download may take up to 900 s; WatchdogSec is 90 s)."""
    sock_path = str(tmp_path / "notify")
    link = SlowRepositoryLink()
    notes: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(0.2)
        done = threading.Event()

        def listen() -> None:  # systemd's side: reads every notification as it comes, until the loop has ended
            while True:
                try:
                    notes.append(sock.recv(4096).decode())
                except TimeoutError:  # a tick that a loaded machine made slow: keep listening
                    if done.is_set():
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        pets: list[str] = []

        class Counting(Notifier):
            """systemd's socket gets what a real one would (a datagram queue that drops when full: the daemon never
            blocks on it); the count is of what the loop sent."""

            def notify(self, **fields: str) -> None:
                pets.extend(k for k, v in fields.items() if (k, v) == ("watchdog", "1"))
                super().notify(**fields)

        daemon = Daemon(paths, ROOMY, link, now=T0, notifier=Counting(sock_path))
        ticking = threading.Thread(target=run_for, args=(daemon, link, 2 * 3600, T0, 10.0), daemon=True)
        started = time.monotonic()
        ticking.start()
        ticking.join(timeout=60)
        try:
            assert not ticking.is_alive(), "the daemon's loop is stuck in the update check"
            assert time.monotonic() - started < 60
            assert link.update_checks == 1  # one check at a time: the hourly one did not start a second
            assert len(link.beats) >= 2 * 3600 // 30 - 2
            done.set()
            listener.join(timeout=10)
            assert len(pets) >= 2 * 3600 // 10 - 1  # one per tick, every 10 s of the two hours
            assert "WATCHDOG=1" in notes and "READY=1" in notes  # through the real socket
        finally:
            done.set()
            link.release.set()
    for _ in range(100):  # the answer arrives; the next tick takes it
        daemon.tick(T0 + 2 * 3600 + 1)
        if daemon.status.update_available:
            break
        time.sleep(0.05)
    assert daemon.status.update_available == "0.3.0"


JOB = "22222222-2222-4222-8222-222222222222"


def test_the_target_the_server_names_is_recorded_and_handed_to_a_watcher(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.daemon import loop as daemon_module
    from agent.update.state import TargetRecord, load_target

    started: list[tuple[str, list[str]]] = []

    def start_updater(p: Paths, init: object, version: str, argv: list[str]) -> str:
        started.append((version, argv))
        return "started"

    monkeypatch.setattr(daemon_module, "start_updater", start_updater)
    record = {"os_tag": "DEBIAN12", "version": "0.1.0", "install_dir": "/usr/local/mobility"}
    paths.agent_config.write_text(json.dumps(record))
    link = FakeLink()
    link.update = {"version": "0.1.1", "job_id": JOB, "pinned": False}
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 200)
    target = load_target(paths)
    assert target is not None and (target.version, target.job_id, target.pinned) == ("0.1.1", JOB, False)
    # One watcher at a time, and no storm while none takes the update lock: at most one start per 3 heartbeats.
    assert [v for v, _ in started] == ["0.1.0", "0.1.0"]
    assert started[0][1][-3:] == ["upgrade", "--root", str(paths.root)]

    # A hostile answer is ignored whole: the last good target stays, and nothing is started for it.
    for hostile in ({"version": "../../x", "job_id": JOB}, {"version": "0.1.2", "job_id": "$(reboot)"}, "0.1.2"):
        link.update = hostile
        before = len(started)
        run_for(daemon, link, 100, start=T0 + 300)
        assert load_target(paths) == target and len(started) == before
    # The server names nothing (a halted rollout withdrew it): nothing is kept.
    link.update = None
    run_for(daemon, link, 40, start=T0 + 400)
    assert load_target(paths) is None
    # A pin at the version it runs: recorded, nothing to start.
    link.update = {"version": "0.1.0", "job_id": None, "pinned": True}
    before = len(started)
    run_for(daemon, link, 200, start=T0 + 500)
    assert load_target(paths) == TargetRecord("0.1.0", None, True, load_target(paths).received)  # type: ignore[union-attr]
    assert len(started) == before


def test_under_a_health_gate_every_heartbeat_carries_a_fresh_report(paths: Paths) -> None:
    """The watcher of an upgrade judges CRITICAL over two heartbeats: the version it judges reports at each one, not
    only every health interval (60 s by default, longer than the gate's grace at a 10 s heartbeat)."""
    from agent import __version__
    from agent.update.state import Phase, UpgradeRecord, save_record

    def report_times(link: FakeLink) -> list[float]:
        return [body["health"]["time"] for _, body in link.beats]

    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 181)
    assert len(set(report_times(link))) < len(link.beats)  # two heartbeats per health interval share a report
    save_record(paths, UpgradeRecord("0.0.9", __version__, JOB, Phase.WATCHING, T0))
    link.beats.clear()
    run_for(daemon, link, 181, start=T0 + 200)
    assert len(set(report_times(link))) == len(link.beats) == 6


@pytest.mark.parametrize("step", [-300.0, 300.0])
def test_a_clock_step_neither_stops_heartbeats_nor_floods_them(paths: Paths, step: float) -> None:
    """The machine's clock steps by five minutes (an NTP correction, a resumed VM): heartbeats go on every interval
    by the time that really passed. A step back used to hold every job up for as long as the step."""
    link = FakeLink()
    daemon = Daemon(paths, ROOMY, link, now=T0)
    run_for(daemon, link, 120)
    before = len(link.beats)
    stepped = T0 + 120 + step  # from here the wall clock reads five minutes off
    run_for(daemon, link, 300, start=stepped)
    sent = len(link.beats) - before
    assert 9 <= sent <= 11, sent  # 300 s at one heartbeat per 30 s (a step forward runs what is due once)
    assert daemon.report["checks"][0]["environment"] is False  # the report says which checks are the environment's
    skews = {c["id"]: c["environment"] for c in daemon.report["checks"]}
    assert skews["HLT-CLOCK-SKEW"] is True and skews["HLT-RSS"] is False
