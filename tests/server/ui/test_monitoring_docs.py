"""docs/monitoring/: the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), and
every metric the rules, the Grafana dashboard and docs/monitoring.md name is one /metrics really exposes, so the docs
cannot rot while the code moves. The vendored chart library is the file its README names."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.shared.replication_wire import DiskReport, Policy, ReplicationReport
from server.api.edge import Connections
from server.api.metrics import ServerMetrics
from server.api.stalls import StallMonitor
from server.database.fleet import FleetRow
from server.database.rollout_rows import Rollout, Selection
from server.ui.exposition import fleet_text
from server.ui.snapshot import Builder, StoreFigures
from tests.conftest import REPO

DOCS = REPO / "docs" / "monitoring"
_METRIC = re.compile(r"\bmobility_[a-z_]+\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: scripts/setup installs Debian's prometheus package, which has it")
    return found


def run_promtool(*args: str, cwd: Path = DOCS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    check = run_promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr
    tests = run_promtool("test", "rules", "alerts.test.yml")
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


def test_promtool_test_rules_can_fail(tmp_path: Path) -> None:
    """The unit tests above hold: an expectation the rules do not meet fails them."""
    shutil.copy(DOCS / "alerts.yml", tmp_path)
    text = (
        (DOCS / "alerts.test.yml")
        .read_text()
        .replace("host_id: h1\n              hostname: web1", "host_id: h2\n              hostname: db1")
    )
    (tmp_path / "alerts.test.yml").write_text(text)
    r = run_promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "MobilityMachineOffline" in r.stdout + r.stderr


def exposed() -> set[str]:
    """Every metric name /metrics exposes, from a fleet that has all of it: machines, disks, points, the store, a
    rollout, and this instance's figures."""
    policy = Policy("gold", 600.0, 120.0)
    report = ReplicationReport((DiskReport("/dev/sdb", "CONTINUOUS", 1 << 30, 0, 1.0, 1e6),), 1.0).to_json()
    row = FleetRow(
        "11111111-1111-4111-8111-111111111111", "web1", "DEBIAN12", "0.1.0", 100.0, 30.0, None, None, None,
        "healthy", policy, False, 100.0, json.dumps(report),
    )  # fmt: skip
    rollout = Rollout("r1", "0.2.0", Selection(all=True), 1, 1, 1, 1, 60.0, "halted", "why", 1.0, 1.0)
    snap = Builder().build(
        [row],
        110.0,
        newest_points={row.host_id: 50.0},
        store=StoreFigures(1, 2, 3, 4),
        rollouts=[(rollout, {"failed": 1})],
    )
    metrics = ServerMetrics(StallMonitor(), Connections(10))
    metrics.heartbeat.observe(0.01)
    metrics.enrolment("enrolled")
    metrics.requests.labels("/v1/heartbeat", "POST", "200").inc()
    names: set[str] = set()
    for text in (fleet_text(snap).decode(), metrics.exposition().decode()):
        for family in text_string_to_metric_families(text):
            names |= {family.name} | {s.name for s in family.samples}
    return names


def test_every_metric_the_docs_name_is_exposed() -> None:
    names = exposed()
    for doc in (DOCS / "alerts.yml", DOCS / "grafana-dashboard.json", REPO / "docs" / "monitoring.md"):
        named = set(_METRIC.findall(doc.read_text()))
        assert named, doc
        missing = sorted(n for n in named if n not in names)
        assert not missing, f"{doc.name} names metrics /metrics does not expose: {missing}"


def test_the_grafana_dashboard_is_one_grafana_imports() -> None:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["panels"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])


def test_the_vendored_chart_library_is_the_one_its_readme_names() -> None:
    vendor = REPO / "server" / "ui" / "static" / "vendor" / "uplot"
    readme = (vendor / "README.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((vendor / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme, name
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
