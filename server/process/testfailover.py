"""A test failover: the point materialised in a scratch area (server/process/scratch.py), then either inspected or
booted, never in the server's kernel.

- Inspected (`test-failover`): every filesystem of every image checked inside the appliance as a booting machine
  would check it (server/process/inspection.py): journal replay, ``fsck -n``, a read-only mount.
- Booted (`test-failover --boot`): the check runner is written into the scratch copy's root filesystem (inside the
  appliance), then the point boots under QEMU with no network at all (server/process/recovery_vm.py), carrying the
  failover mark as an SMBIOS OEM string (agent/shared/failover_mark.py); the runner says when the machine reached
  multi-user.target and runs the machine's own checks from /etc/mobility/recovery.d
  (server/process/recovery_checks.py); the VM is destroyed after (`keep`: left running for the operator).

Every step is reported with its time. However it ends (a failure, SIGTERM or Ctrl-C as FAILOVER-INTERRUPTED, kill -9),
no VM outlives the command, and its scratch area is removed then or swept by the next run."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.faults import fault_point
from agent.shared.failover_mark import FailoverMark
from server.errors import FailoverNotBootable, PointCorrupt
from server.process import recovery_checks as checks
from server.process import scratch as areas
from server.process.appliance import Appliance, ApplianceError
from server.process.failover import materialise
from server.process.inspection import FsResult, Inspect, check_filesystem, disk_of, find_root, write_files
from server.process.recovery_vm import BootSpec, BootVM, VmStopped, accelerator, take_slot
from server.process.store import ChunkStore, Point
from server.progress import Progress

DEFAULT_WAIT = 3600.0  # for a VM slot
DEFAULT_BOOT_TIMEOUT = 900.0  # to multi-user.target: a TCG boot on a loaded machine takes minutes
RUNNER_SLACK = 60.0  # beyond a check's own timeout, before the runner is taken for lost


@dataclass(frozen=True)
class BootOptions:
    memory_mib: int = 1024
    cpus: int = 1
    bus: str = "virtio"
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    check_timeout: int = checks.DEFAULT_CHECK_TIMEOUT


@dataclass
class Step:
    step: str
    ok: bool = True
    seconds: float = 0.0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
            **self.extra,
        }


class Steps:
    def __init__(self) -> None:
        self.items: list[Step] = []

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[Step]:
        step = Step(name)
        started = time.monotonic()
        try:
            yield step
        except BaseException:
            step.ok = False
            raise
        finally:
            step.seconds = time.monotonic() - started
            self.items.append(step)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.items)


def left_behind(area: Path) -> list[str]:
    """Processes still running that name the scratch area (a VM, the appliance): none, when we are done."""
    found = []
    needle = str(area)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and any(needle in arg for arg in proc.info["cmdline"] or ()):
                found.append(f"process {proc.pid} ({(proc.info['cmdline'] or ['?'])[0]})")
    return found


def run_test_failover(
    store: ChunkStore,
    point: Point,
    scratch: Path,
    *,
    keep: bool = False,
    boot: BootOptions | None = None,
    inspect: Inspect | None = None,
    progress: Progress | None = None,
    wait: float = DEFAULT_WAIT,
) -> dict[str, Any]:
    """Test a failover of ``point`` in an area under ``scratch``: inspect its filesystems, or with ``boot`` boot it and
    run its checks. ``inspect`` is called with (disk or volume, device, reader) while each filesystem is mounted
    read-only in the appliance (the tests read files through it). The report; PointCorrupt and FailoverNotBootable
    are reported there too (``error``)."""
    began = time.monotonic()
    steps = Steps()
    report: dict[str, Any] = {
        "point_id": point.point_id,
        "consistency": point.consistency,
        "mode": "boot" if boot else "inspect",
        "accelerator": accelerator()[0],
        "disks": [],
        "volumes": [],
        "steps": [],
        "left_behind": [],
        "scratch": None,
    }
    with areas.area(scratch, point.point_id, keep=keep) as work:
        report["scratch"] = str(work.path) if keep else None
        try:
            try:
                with steps.timed("materialise") as step:
                    images = materialise(store, point, work.path / "images", progress)
                    step.detail = f"{len(images)} disk(s), {sum(d.size for d in point.disks) / (1 << 30):.2f} GiB"
            except PointCorrupt as e:
                report.update(error=e.id, message=e.message)
                return _finish(report, steps, began)
            report["disks"] = [
                {"disk": d.disk, "image": str(i), "root_hash": "ok", "filesystems": []}
                for d, i in zip(point.disks, images, strict=True)
            ]
            slot = take_slot(wait)
            try:
                if boot is None:
                    _inspect(images, point, work.path, report, steps, inspect)
                else:
                    _boot(images, point, work, boot, keep, slot, report, steps, began)
            finally:
                os.close(slot)
        finally:
            report["left_behind"] = left_behind(work.path) if not report.get("vm") else []
    return _finish(report, steps, began)


def _finish(report: dict[str, Any], steps: Steps, began: float) -> dict[str, Any]:
    report["steps"] = [s.to_json() for s in steps.items]
    report["seconds"] = round(time.monotonic() - began, 2)
    fs_ok = all(FsResult(**fs).ok for d in report["disks"] for fs in d["filesystems"]) and all(
        FsResult(**fs).ok for fs in report["volumes"]
    )
    report["ok"] = not report.get("error") and steps.ok and fs_ok and not report["left_behind"]
    return report


def _inspect(
    images: list[Path], point: Point, work: Path, report: dict[str, Any], steps: Steps, inspect: Inspect | None
) -> None:
    with steps.timed("inspect") as step:
        try:
            with Appliance(images, work / "appliance", writable=False) as appliance:
                appliance.launch()
                fault_point("failover.step", step="launched", disk="")
                disks = appliance.devices()
                found = appliance.filesystems()
                for device, fstype in found:
                    index = disk_of(device, disks)
                    where = point.disks[index].disk if index is not None and index < len(point.disks) else device
                    result = check_filesystem(appliance, device, fstype, where, work, inspect).__dict__
                    if index is not None and index < len(report["disks"]):
                        report["disks"][index]["filesystems"].append(result)
                    else:
                        report["volumes"].append(result)
                appliance.close()
            step.detail = f"appliance up in {appliance.launch_seconds:.1f} s; {len(found)} filesystem(s) found"
            step.extra["appliance_boot"] = round(appliance.launch_seconds, 2)
        except ApplianceError as e:
            step.ok, step.detail = False, f"the appliance failed: {e}"


def _boot(
    images: list[Path],
    point: Point,
    work: areas.Area,
    options: BootOptions,
    keep: bool,
    slot: int,
    report: dict[str, Any],
    steps: Steps,
    began: float,
) -> None:
    nonce = secrets.token_hex(8)
    mark = FailoverMark("test", point.host_id, point.point_id, point.created, time.time())
    with steps.timed("prepare") as step:
        runner, unit = work.path / "runner.sh", work.path / "unit.service"
        runner.write_text(checks.runner_text(nonce, point.point_id, point.host_id, options.check_timeout))
        unit.write_text(checks.unit_text(point.point_id))
        try:
            with Appliance(images, work.path / "appliance", writable=True) as appliance:
                appliance.launch()
                fault_point("failover.step", step="launched", disk="")
                root, why = find_root(appliance)
                if root is None or not root.systemd:
                    why = why or f"{root.device if root else '?'} has no /etc/systemd/system: not a systemd machine"
                    appliance.close()
                    raise FailoverNotBootable(f"point {point.point_id}: {why}")
                write_files(
                    appliance,
                    root,
                    {checks.RUNNER_PATH: (runner, 0o755), checks.UNIT_PATH: (unit, 0o644)},
                    {checks.WANTS_LINK: checks.UNIT_PATH},
                )
                appliance.close()
        except FailoverNotBootable as e:
            step.ok, step.detail = False, e.message
            report.update(error=e.id, message=e.message)
            return
        except ApplianceError as e:
            step.ok, step.detail = False, f"the appliance failed: {e}"
            return
        step.detail = (
            f"root filesystem {root.device} ({root.fstype}); the check runner written into the scratch copy "
            f"(appliance up in {appliance.launch_seconds:.1f} s)"
        )
        step.extra["appliance_boot"] = round(appliance.launch_seconds, 2)

    spec = BootSpec(tuple(images), options.memory_mib, options.cpus, options.bus, (mark.smbios(),))
    (work.path / "vm").mkdir()
    vm = BootVM(work.path / "vm", spec)
    kept = False
    try:
        events = _Events(vm, nonce)
        with steps.timed("boot") as step:
            try:
                vm.start(keep=keep, hand_over=(slot, work.lock_fd))
            except VmStopped as e:
                step.ok, step.detail = False, str(e)
                return
            fault_point("failover.step", step="booting", disk="")
            booted = events.next(time.monotonic() + options.boot_timeout, "multi-user.target")
            if booted is None or booted.kind != "BOOTED":
                step.ok = False
                step.detail = events.why or "the check runner did not say the machine booted"
                step.extra["console"] = vm.console.text_tail()
                return
            report["rto_seconds"] = round(time.monotonic() - began, 2)
            units = ", ".join(booted.failed_units) or "none"
            step.detail = f"multi-user.target reached (guest uptime {booted.uptime:.1f} s); failed units: {units}"
            step.extra.update(guest_uptime=booted.uptime, failed_units=list(booted.failed_units))
        report["checks"] = _run_checks(events, options, steps)
        if keep:
            vm.leave_running()
            kept = True
            report["vm"] = {
                "pid": vm.pid,
                "console": str(vm.workdir / "console.sock"),
                "attach": f"cd {vm.workdir} && socat -,raw,echo=0 UNIX-CONNECT:console.sock",
                "stop": f"kill {vm.pid}",
            }
    finally:
        if not kept:
            with steps.timed("destroy") as step:
                vm.kill()
                step.detail = "the VM stopped; its scratch data goes with the area"


class _Events:
    """The runner's events, one at a time, from the VM's report line."""

    def __init__(self, vm: BootVM, nonce: str) -> None:
        self.vm, self.nonce = vm, nonce
        self.index = 0
        self.why = ""
        self.unparsed: list[str] = []

    def next(self, deadline: float, waiting_for: str) -> checks.Event | None:
        while True:
            try:
                line = self.vm.next_line(self.index, deadline)
            except VmStopped as e:
                self.why = f"{e} before {waiting_for}"
                return None
            if line is None:
                self.why = f"{waiting_for}: nothing within the time allowed"
                return None
            self.index += 1
            try:
                event = checks.parse(line, self.nonce)
            except checks.BadLine as e:
                self.unparsed.append(str(e))
                continue
            if event is not None:
                return event


def _run_checks(events: _Events, options: BootOptions, steps: Steps) -> list[dict[str, Any]]:
    """The checks' events until the runner's end, each check a step of its own."""
    found: list[dict[str, Any]] = []
    current: str | None = None
    while True:
        event = events.next(
            time.monotonic() + options.check_timeout + RUNNER_SLACK,
            f"the end of check {current}" if current else "the next check",
        )
        if event is None:
            with steps.timed(f"check {current or '(runner)'}") as step:
                step.ok, step.detail = False, events.why
            return found
        if event.kind == "DONE":
            return found
        if event.kind == "BEGIN":
            current = event.name
            continue
        if len(found) >= checks.MAX_CHECKS:
            continue
        if event.kind == "SKIP":
            found.append({"name": event.name, "ok": None, "skipped": event.why})
            with steps.timed(f"check {event.name}") as step:
                step.detail = f"skipped ({event.why}): not run"
            continue
        if event.kind == "END":
            current = None
            seconds = max(event.end - event.start, 0.0)
            result = {
                "name": event.name,
                "ok": event.exit == 0,
                "exit": event.exit,
                "timed_out": checks.timed_out(event.exit),
                "seconds": round(seconds, 2),
                "output": event.output,
            }
            found.append(result)
            step = Step(f"check {event.name}", event.exit == 0, seconds)
            last = event.output.strip().splitlines()[-1:] or [""]
            step.detail = ("passed" if event.exit == 0 else f"exit {event.exit}") + (
                f": {last[0][:200]}" if last[0] else ""
            )
            if result["timed_out"]:
                step.detail = f"ran past {options.check_timeout} s (stopped)"
            step.extra.update(exit=event.exit, output=event.output)
            steps.items.append(step)
