"""The dashboard in a real browser: Playwright driving Debian's chromium (never a downloaded browser), against a real
server with real enrolled machines, one of them a running agent protecting a loop-device disk with ext4 (a point
cut), and a rollout to the others. Every page loads with no console error and shows the right machines and figures;
the machines table filters and sorts; a disk's lag chart takes new samples without a reload; a test failover and a
halt are started from the pages and recorded; off loopback a login is required, a change without the page's CSRF
token is refused, and the audit log names the operator who paused protection.

Each page's screenshot is kept under pytest's base temporary directory, in ``dashboard-screenshots/`` (the path is
printed; docs/monitoring.md says so too)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scripts.localserver import ui_url
from scripts.replication_lab import Disk, Lab, Machine, Server, wait_for
from tests.bundle_factory import make_bundle
from tests.conftest import require_root

pytestmark = pytest.mark.integration

MIB = 1 << 20
CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that reaches the network on its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROLLOUT_VERSION = "9.0.0"
VIEWPORT = {"width": 1400, "height": 1000}


@dataclass
class Fleet:
    lab: Lab
    server: Server
    machine: Machine  # runs its agent, protects ``disk``
    disk: Disk
    others: list[Machine]  # enrolled, never started: the rollout's machines
    point_id: str
    rollout_id: str
    ui: str
    shots: Path
    browser: Any
    errors: list[str] = field(default_factory=list)

    def page(self, context: Any = None) -> Any:
        """A page that records every console error and uncaught exception."""
        page = context.new_page() if context is not None else self.browser.new_page(viewport=VIEWPORT)
        page.on("console", lambda m: self.errors.append(f"{page.url}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        return page

    def open(self, page: Any, path: str, shot: str | None = None) -> None:
        """Go to ``path`` and wait until its data is shown (the page counts its refreshes)."""
        before = len(self.errors)
        page.goto(self.ui + path)
        page.wait_for_selector("body[data-refreshed]", timeout=30_000)  # no string evaluated: the CSP forbids it
        if shot:
            page.screenshot(path=str(self.shots / f"{shot}.png"), full_page=True)
        assert self.errors[before:] == [], self.errors[before:]

    def audit(self) -> list[dict[str, Any]]:
        return list(self.server.json("audit"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_root()
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    shots = tmp_path_factory.getbasetemp() / "dashboard-screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    work = tmp_path_factory.mktemp("dashboard")
    with Lab(work / "lab") as lab, sync_playwright() as playwright:
        server = lab.server("server", "--ui-refresh", "1", heartbeat=1.0)
        disk = lab.disk("d1", 64 * MIB, ("ext4",))
        (disk.mounts[0] / "records.txt").write_text("".join(f"record {i}\n" for i in range(1000)))
        machine = lab.machine(server, "m1")
        lab.expose(machine, disk)
        server.cli("policy", "set", "gold", "--rpo", "15m", "--interval", "7d", "--retention", "10")
        server.cli("protect", "--machine", machine.host_id, "--disk", disk.loop, "--policy", "gold")
        lab.start_agent(machine)
        lab.wait_state(machine, disk, "CONTINUOUS")
        point = machine.point()
        others = [lab.machine(server, name) for name in ("s1", "s2", "s3")]
        bundle = make_bundle(work, "DEBIAN12", ROLLOUT_VERSION)
        server.cli("repo", "add", str(bundle))
        ids = ",".join(m.host_id for m in others)
        started = json.loads(
            server.cli("update", "--to", ROLLOUT_VERSION, "--machines", ids, "--wave", "1", "--json").stdout
        )
        url = ui_url(server.data)
        assert url is not None and url.startswith("http://127.0.0.1:")
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield Fleet(
                lab, server, machine, disk, others, str(point["point_id"]), started["rollout_id"], url, shots, browser
            )
        finally:
            browser.close()
            print(f"dashboard screenshots: {shots}")


def rows(page: Any, table: str) -> list[list[str]]:
    return [
        [c.strip() for c in r]
        for r in page.eval_on_selector_all(
            f"#{table} tbody tr:not(.empty)", "rs => rs.map(r => Array.from(r.cells).map(c => c.textContent))"
        )
    ]


def test_every_page_loads_without_a_console_error_and_shows_the_fleet(fleet: Fleet) -> None:
    page = fleet.page()
    m = fleet.machine
    fleet.open(page, "/", "overview")
    wait_for(
        "the overview to count every machine", lambda: "total4" in page.text_content("#card-machines").replace(" ", "")
    )
    assert "online1" in page.text_content("#card-machines").replace(" ", "")
    assert "protected disks1" in page.text_content("#card-protection")
    # The machines were all enrolled before the rollout started: a snapshot of the fleet can count them and still
    # predate the rollout (the dashboard rebuilds it every second).
    wait_for(
        "the overview to show the rollout", lambda: [r[1] for r in rows(page, "active-rollouts")] == [ROLLOUT_VERSION]
    )
    assert rows(page, "by-os-tag") == [["DEBIAN12", "4"]]

    fleet.open(page, "/machines", "machines")
    listed = rows(page, "machines")
    assert [r[0] for r in listed] == ["m1", "s1", "s2", "s3"]
    m1 = listed[0]
    assert m1[1] == m.host_id and m1[5] == "online" and m1[7] == "CONTINUOUS" and m1[8].endswith("/ 15 min")

    fleet.open(page, f"/machines/{m.host_id}", "machine")
    page.wait_for_selector(f"#disks tbody tr[data-disk='{fleet.disk.loop}']")
    disk = rows(page, "disks")[0]
    assert disk[0] == fleet.disk.loop and disk[1] == "CONTINUOUS" and disk[2] == "64.0 MiB" and disk[5] == "15 min"
    points = rows(page, "points")
    assert points[0][0] == fleet.point_id and points[0][2] == "crash-consistent" and points[0][4] == "yes"
    assert {"HLT-DAEMON", "HLT-REPLICATION"} <= {c[0] for c in rows(page, "health-checks")}
    assert page.is_visible("#pause") and page.is_visible("#test-failover")

    fleet.open(page, "/protection", "protection")
    assert rows(page, "protected-disks")[0][:3] == ["m1", fleet.disk.loop, "CONTINUOUS"]
    assert "1 protected disks, 0 past their RPO target" in page.text_content("#protection-summary")

    fleet.open(page, "/rollouts", "rollouts")
    listed = rows(page, "rollouts")
    assert listed[0][1] == ROLLOUT_VERSION and listed[0][3] == "running" and listed[0][4] == "1 of 3"
    fleet.open(page, f"/rollouts/{fleet.rollout_id}", "rollout")
    members = rows(page, "rollout-machines")
    assert sorted(r[0] for r in members) == ["s1", "s2", "s3"]
    assert sorted((r[1], r[5]) for r in members) == [("1", "offered"), ("2", "waiting"), ("3", "waiting")]

    fleet.open(page, "/audit", "audit")
    metrics = page.request.get(fleet.ui + "/metrics").text()
    assert 'mobility_enrolments_total{outcome="enrolled"} 4.0' in metrics
    assert f'mobility_disk_state{{host_id="{m.host_id}",disk="{fleet.disk.loop}",state="CONTINUOUS"}} 1' in metrics
    page.close()
    assert fleet.errors == []


def test_the_machines_table_filters_and_sorts(fleet: Fleet) -> None:
    page = fleet.page()
    fleet.open(page, "/machines")

    def names() -> list[str]:
        return [r[0] for r in rows(page, "machines")]

    page.fill("#filter-q", "s2")
    wait_for("the text filter", lambda: names() == ["s2"])
    assert "q=s2" in page.url  # the filter is in the address: a reload or a link keeps it
    page.fill("#filter-q", "")
    wait_for("no text filter", lambda: len(names()) == 4)
    page.select_option("#filter-state", "online")
    wait_for("the state filter", lambda: names() == ["m1"])
    page.select_option("#filter-state", "")
    page.select_option("#filter-protection", "unprotected")
    wait_for("the protection filter", lambda: names() == ["s1", "s2", "s3"])
    page.select_option("#filter-protection", "")
    page.click("th[data-sort='hostname']")
    wait_for("hostnames descending", lambda: names() == ["s3", "s2", "s1", "m1"])
    page.click("th[data-sort='state']")
    wait_for("by state", lambda: names()[0] == "m1")
    assert "sort=state" in page.url
    assert page.text_content("#machines-count").startswith("1\u20134 of 4")
    page.close()
    assert fleet.errors == []


def test_the_lag_chart_takes_new_samples_without_a_reload(fleet: Fleet) -> None:
    page = fleet.page()
    fleet.open(page, f"/machines/{fleet.machine.host_id}")
    chart = "#chart-lag-0"
    page.wait_for_selector(f"{chart} canvas")  # uPlot drew it
    assert page.get_attribute(chart, "data-disk") == fleet.disk.loop
    first = int(page.get_attribute(chart, "data-samples") or 0)
    page.evaluate("window.__same_document = true")
    # The agent reports every heartbeat (1 s), the dashboard reads the fleet every second: new samples arrive.
    wait_for("the lag chart to grow", lambda: int(page.get_attribute(chart, "data-samples") or 0) >= first + 3, 60)
    assert page.evaluate("window.__same_document") is True  # the same page, never reloaded
    values = json.loads(page.get_attribute(chart, "data-values") or "[]")
    assert len(values) == 1 and (values[0] is None or values[0] >= 0)
    page.screenshot(path=str(fleet.shots / "machine-lag-chart.png"), full_page=True)
    page.close()
    assert fleet.errors == []


def test_a_test_failover_started_from_the_dashboard_passes_and_is_recorded(fleet: Fleet) -> None:
    page = fleet.page()
    page.on("dialog", lambda d: d.accept())
    fleet.open(page, f"/machines/{fleet.machine.host_id}")
    page.click("#test-failover")
    page.wait_for_selector("#banner.info")
    fleet.open(page, "/protection")
    wait_for(
        "the test failover's result",
        lambda: bool(rows(page, "test-failovers")) and rows(page, "test-failovers")[0][2] == "PASSED",
        timeout=240,
    )
    result = rows(page, "test-failovers")[0]
    assert result[1] == "m1" and fleet.point_id in result[4] and "fsck clean" in result[4]
    page.screenshot(path=str(fleet.shots / "protection-test-failover.png"), full_page=True)
    entry = fleet.audit()[0]
    assert (entry["operator"], entry["action"], entry["outcome"]) == ("loopback", "start test failover", "done: PASSED")
    jobs = [j for j in fleet.server.json("jobs") if j["kind"] == "test-failover"]
    assert [(j["host_id"], j["state"]) for j in jobs] == [(fleet.machine.host_id, "succeeded")]
    page.close()
    assert fleet.errors == []


def test_the_rollout_is_halted_from_its_page_with_a_reason(fleet: Fleet) -> None:
    page = fleet.page()
    page.on("dialog", lambda d: d.accept("the 9.0.0 build is bad"))
    fleet.open(page, f"/rollouts/{fleet.rollout_id}")
    page.click("#halt")
    wait_for(
        "the halted rollout", lambda: "halted by loopback from the dashboard" in page.text_content("#rollout-info")
    )
    assert "the 9.0.0 build is bad" in page.text_content("#rollout-info")
    wait_for("the withdrawn machine", lambda: "withdrawn" in [r[5] for r in rows(page, "rollout-machines")])
    page.screenshot(path=str(fleet.shots / "rollout-halted.png"), full_page=True)
    assert not page.is_visible("#halt")
    entry = fleet.audit()[0]
    assert (entry["action"], entry["detail"], entry["outcome"].split(":")[0]) == (
        "halt rollout",
        "the 9.0.0 build is bad",
        "done",
    )
    page.close()
    assert fleet.errors == []


def test_off_loopback_a_login_is_needed_changes_need_the_csrf_token_and_the_audit_names_the_operator(
    fleet: Fleet,
) -> None:
    """Last: the server restarts with its dashboard on every address (TLS, operators only)."""
    token = fleet.server.cli("operator", "add", "alice").stdout.strip()
    fleet.lab.restart(
        fleet.server,
        "--ui-refresh",
        "1",
        "--ui-listen",
        "0.0.0.0:0",
        "--process-listen",
        f"127.0.0.1:{fleet.server.process_port}",
        heartbeat=1.0,
    )
    url = ui_url(fleet.server.data)
    assert url is not None and url.startswith("https://0.0.0.0:")
    fleet.ui = "https://127.0.0.1:" + url.rsplit(":", 1)[1]
    context = fleet.browser.new_context(ignore_https_errors=True)  # the server's CA is not the browser's
    page = fleet.page(context)
    page.goto(fleet.ui + f"/machines/{fleet.machine.host_id}")
    assert re.search(r"/login\?next=", page.url), page.url
    page.screenshot(path=str(fleet.shots / "login.png"), full_page=True)
    assert page.request.get(fleet.ui + "/api/overview").status == 401
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-refreshed]", timeout=30_000)  # no string evaluated: the CSP forbids it
    assert page.url.endswith(f"/machines/{fleet.machine.host_id}")
    assert "alice" in page.text_content("header .who")
    # A change asked without the page's CSRF token (any script of another origin could do this much) is refused.
    refused = page.evaluate(
        "async (u) => { const r = await fetch(u, {method: 'POST', credentials: 'same-origin'}); "
        "return [r.status, (await r.json()).error.code]; }",
        f"{fleet.ui}/api/machines/{fleet.machine.host_id}/pause",
    )
    assert refused == [403, "UI-CSRF-REFUSED"]
    assert not any(e["operator"] == "alice" for e in fleet.audit())
    page.click("#pause")
    page.wait_for_selector("#resume")
    protection = fleet.server.json("protection")["machines"][0]
    assert protection["paused"] is True
    entry = fleet.audit()[0]
    assert (entry["operator"], entry["action"], entry["outcome"]) == ("alice", "pause protection", "done")
    assert entry["via"].startswith("dashboard (session) from 127.0.0.1")
    assert entry["target"] == f"m1 ({fleet.machine.host_id})"
    fleet.open(page, "/audit", "audit-off-loopback")
    assert rows(page, "audit")[0][1:3] == ["alice", "pause protection"]
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    assert page.request.get(fleet.ui + "/api/overview").status == 401
    fleet.server.cli("protect", "--machine", fleet.machine.host_id, "--resume")
    context.close()
    # The 401s above were asked for; nothing else went wrong on a page.
    assert [e for e in fleet.errors if "401" not in e and "403" not in e] == []
