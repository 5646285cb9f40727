"""The replication commands of `mobility-server`: protect, unprotect, protection, policy, points, failover,
test-failover, verify and store repair. Every one takes --data like the rest; the point commands read the chunk store
beside a running server (they never write it); `store repair` takes the store's writer lock."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.shared import timefmt
from agent.shared.errors import Exit, MobilityError
from agent.shared.replication_wire import Policy, disk_name
from agent.shared.textsafe import printable, shown
from agent.shared.wire import WireError
from server.commandline import count, data_dir, open_storage, parse_duration, parse_size, print_table
from server.datadir import DataDir
from server.errors import (
    FailoverNotBootable,
    MachineNotFound,
    PointCorrupt,
    PolicyInvalid,
    PolicyNotFound,
    ProtectDiskInvalid,
    TestFailoverFailed,
)

if TYPE_CHECKING:  # imported where used: every `mobility-server` command builds this parser, few open the store
    from server.database.machines import Machine
    from server.database.storage import Storage
    from server.process.inspection import Inspect
    from server.process.store import ChunkStore, Point

Command = Callable[[str, str], argparse.ArgumentParser]


def find_machine(storage: Storage, text: str) -> Machine:
    """A machine by host ID, or by hostname when exactly one machine has it."""
    found = storage.machine(text)
    if found is not None:
        return found
    named = [m for m in storage.machines() if m.hostname == text]
    if len(named) == 1:
        return named[0]
    if named:
        raise MachineNotFound(f"{len(named)} machines are named {text!r}: give the host ID")
    raise MachineNotFound(f"no machine {text!r}")


def _stamp(t: float | None) -> str:
    return timefmt.shown(t, never="-")


def _duration(text: str, flag: str) -> float:
    try:
        return parse_duration(text)
    except MobilityError as e:
        raise PolicyInvalid(f"{flag}: {e.message}") from e


def _bandwidth(text: str) -> int:
    try:
        return parse_size(text, "--bandwidth")
    except MobilityError as e:
        raise PolicyInvalid(f"{e.message} (bytes per second, like 50M, or 0)") from e


# The flag of each policy field, for the message when the agent's bounds refuse one.
_POLICY_FLAGS = {
    "policy.name": "NAME",
    "policy.rpo_seconds": "--rpo",
    "policy.interval_seconds": "--interval",
    "policy intervals": "--rpo/--interval",
    "policy.bandwidth_bps": "--bandwidth",
    "policy.retention": "--retention",
}


def _agent_accepts(policy: Policy) -> Policy:
    """``policy`` as every agent reads it from its heartbeat answer (the wire's own bounds: no second copy of them
    here), or POLICY-INVALID: the server never stores a policy its agents would refuse."""
    try:
        return Policy.from_json(policy.to_json())
    except WireError as e:
        said = str(e)
        flag = next((f for field, f in _POLICY_FLAGS.items() if said.startswith(field)), "policy")
        raise PolicyInvalid(f"{flag}: {said} (what agents accept)") from e


# Protection ----------------------------------------------------------------------------------------------------


def cmd_protect(args: argparse.Namespace) -> int:
    """Protect disks (--disk or --all-disks), or change a protected machine as it stands: --pause, --resume and
    --policy without disks keep the disks it protects."""
    data = data_dir(args)
    if args.disk and args.all_disks:
        raise ProtectDiskInvalid("give --disk /dev/X (repeatable) or --all-disks, not both")
    changing = not args.disk and not args.all_disks
    if changing and args.pause is None and args.policy is None:
        raise ProtectDiskInvalid(
            "give --disk /dev/X (repeatable) or --all-disks; or --pause, --resume or --policy for a protected machine"
        )
    try:
        disks = [disk_name(d, "--disk") for d in args.disk or []]
    except WireError as e:
        raise ProtectDiskInvalid(str(e)) from e
    storage = open_storage(args, data)
    try:
        machine = find_machine(storage, args.machine)
        if args.policy is not None and storage.policy(args.policy) is None:
            raise PolicyNotFound(f"no policy {shown(args.policy, 40)}")
        if changing:
            if not storage.change_protection(machine.host_id, time.time(), paused=args.pause, policy=args.policy):
                raise ProtectDiskInvalid(
                    f"{printable(machine.hostname, 80)} ({machine.host_id}) is not protected: give --disk /dev/X or "
                    "--all-disks to protect it"
                )
        else:
            current = storage.protection(machine.host_id)
            policy = args.policy or (current.policy.name if current else "default")
            if storage.policy(policy) is None:
                raise PolicyNotFound(f"no policy {shown(policy, 40)}")
            paused = args.pause if args.pause is not None else (current.paused if current else False)
            storage.protect(machine.host_id, list(dict.fromkeys(disks)), args.all_disks, policy, paused, time.time())
        now = storage.protection(machine.host_id)
    finally:
        storage.close()
    if now is None:  # unprotected by another command in between
        raise ProtectDiskInvalid(f"{machine.host_id} was unprotected meanwhile: protect it again")
    what = "all disks" if now.all_disks else ", ".join(now.disks)
    state = " (paused)" if now.paused else ""
    name = printable(machine.hostname, 80)
    print(f"{name} ({machine.host_id}): protecting {what} under policy {now.policy.name}{state}")
    print("the machine picks this up at its next heartbeat")
    return Exit.OK


def cmd_unprotect(args: argparse.Namespace) -> int:
    data = data_dir(args)
    storage = open_storage(args, data)
    try:
        machine = find_machine(storage, args.machine)
        removed = storage.unprotect(machine.host_id)
    finally:
        storage.close()
    if removed:
        print(f"{machine.hostname} ({machine.host_id}): no longer protected; its recovery points are kept")
    else:
        print(f"{machine.hostname} ({machine.host_id}) was not protected")
    return Exit.OK


def cmd_protection(args: argparse.Namespace) -> int:
    data = data_dir(args)
    storage = open_storage(args, data)
    rows: list[dict[str, Any]] = []
    try:
        for p in storage.protections():
            machine = storage.machine(p.host_id)
            report = p.report
            rows.append(
                {
                    "host_id": p.host_id,
                    "hostname": machine.hostname if machine else None,
                    "online": machine.online(time.time()) if machine else False,
                    "disks": list(p.disks),
                    "all_disks": p.all_disks,
                    "policy": p.policy.to_json(),
                    "paused": p.paused,
                    "replication": report.to_json() if report else None,
                }
            )
    finally:
        storage.close()
    usage = _store_usage(data)
    if args.json:
        print(json.dumps({"machines": rows, "store": usage}, indent=2))
        return Exit.OK
    table = []
    for r in rows:
        shown: dict[str, Any] = r["replication"] or {}
        disks = {d["disk"]: d for d in shown.get("disks", [])}
        names = sorted(set(r["disks"]) | set(disks)) or (["(all disks)"] if r["all_disks"] else [])
        for name in names:
            d = disks.get(name, {})
            table.append(
                [
                    r["hostname"] or r["host_id"],
                    name,
                    "PAUSED" if r["paused"] and not d else d.get("state", "waiting for the machine"),
                    _bytes(d.get("bytes_left")),
                    _secs(d.get("lag_seconds")),
                    _bytes(d.get("throughput_bps")) + "/s" if d else "-",
                    _secs(d.get("eta_seconds")),
                    _stamp(shown.get("last_point")),
                    r["policy"]["name"],
                    d.get("error"),
                ]
            )
    print_table(
        ["MACHINE", "DISK", "STATE", "LEFT", "LAG", "THROUGHPUT", "ETA", "LAST POINT", "POLICY", "ERROR"], table
    )
    for r in rows:
        plan = (r["replication"] or {}).get("next_point")
        if plan:
            print(
                f"{r['hostname'] or r['host_id']}: next point: expected freeze {plan['expected_freeze_ms']:.0f} ms; "
                f"writes change {_bytes(plan['dirty_bps'])}/s, replication sends {_bytes(plan['send_bps'])}/s"
                + (f"; POSTPONED: {plan['postponed']}" if plan.get("postponed") else "")
            )
    if usage:
        print(
            f"store: {_bytes(usage['store_bytes'])} in {usage['chunks']} chunks; {_bytes(usage['free_bytes'])} free "
            f"({_bytes(usage['reserve_bytes'])} reserve){'' if usage['accepting'] else '; REFUSING NEW DATA'}"
        )
    return Exit.OK


def _store_usage(data: DataDir) -> dict[str, Any] | None:
    from server.process.service import store_dir
    from server.process.store import DEFAULT_RESERVE, ChunkStore

    if not (store_dir(data) / "index.db").exists():
        return None
    store = ChunkStore(store_dir(data))
    try:
        u = store.usage()
    finally:
        store.close()
    return {
        "store_bytes": u.store_bytes,
        "chunks": u.chunks,
        "free_bytes": u.free_bytes,
        "reserve_bytes": DEFAULT_RESERVE,
        "accepting": u.free_bytes > DEFAULT_RESERVE,
    }


def _number(n: object) -> float | None:
    """A figure a machine reported, if it can be shown: finite and not negative (a stored report may predate the
    bounds the wire checks now)."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return None
    value = float(n)
    return value if math.isfinite(value) and value >= 0 else None


def _bytes(n: object) -> str:
    value = _number(n)
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB" if value < 1024 else f"{value:.3g} PiB"


def _secs(n: object) -> str:
    s = _number(n)
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.0f} h" if s < 172800 else f"{s / 86400:.3g} d"


def cmd_policy(args: argparse.Namespace) -> int:
    data = data_dir(args)
    storage = open_storage(args, data)
    try:
        if args.action == "set":
            old = storage.policy(_agent_accepts(Policy(args.name)).name) or Policy(args.name)
            policy = Policy(
                args.name,
                _duration(args.rpo, "--rpo") if args.rpo else old.rpo_seconds,
                _duration(args.interval, "--interval") if args.interval else old.interval_seconds,
                _bandwidth(args.bandwidth) if args.bandwidth is not None else old.bandwidth_bps,
                args.retention if args.retention is not None else old.retention,
            )
            storage.set_policy(_agent_accepts(policy))
        policies = storage.policies()
    finally:
        storage.close()
    if args.json:
        print(json.dumps([p.to_json() for p in policies], indent=2))
        return Exit.OK
    print_table(
        ["NAME", "RPO", "INTERVAL", "BANDWIDTH", "RETENTION"],
        [
            [
                p.name,
                _secs(p.rpo_seconds),
                _secs(p.interval_seconds),
                _bytes(p.bandwidth_bps) + "/s" if p.bandwidth_bps else "no cap",
                p.retention,
            ]
            for p in policies
        ],
    )
    return Exit.OK


# Points and failover -------------------------------------------------------------------------------------------


def _open(args: argparse.Namespace) -> tuple[DataDir, ChunkStore, Machine]:
    from server.process.service import store_dir
    from server.process.store import ChunkStore

    data = data_dir(args)
    storage = open_storage(args, data)
    try:
        machine = find_machine(storage, args.machine)
    finally:
        storage.close()
    return data, ChunkStore(store_dir(data)), machine


def _point_json(p: Point) -> dict[str, Any]:
    return {
        "point_id": p.point_id,
        "host_id": p.host_id,
        "created": p.created,
        "consistency": p.consistency,
        "complete": p.complete,
        "disks": [{"disk": d.disk, "size": d.size, "chunk_size": d.chunk_size, "root": d.root} for d in p.disks],
    }


def cmd_points(args: argparse.Namespace) -> int:
    _, store, machine = _open(args)
    try:
        points = store.points(machine.host_id)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_point_json(p) for p in points], indent=2))
        return Exit.OK
    print_table(
        ["POINT", "CREATED", "CONSISTENCY", "DISKS"],
        [[p.point_id, _stamp(p.created), p.consistency, ", ".join(d.disk for d in p.disks)] for p in points],
    )
    return Exit.OK


def _scratch(args: argparse.Namespace, data: DataDir) -> Path:
    from server.process.service import scratch_dir

    return Path(args.scratch) if args.scratch else scratch_dir(data)


def _bounded_duration(text: str, flag: str, low: float, high: float) -> float:
    from server.errors import BadDuration

    try:
        seconds = parse_duration(text)
    except BadDuration as e:
        raise BadDuration(f"{flag}: {e.message}") from e
    if not low <= seconds <= high:
        raise BadDuration(f"{flag} {shown(text, 40)} is not from {low:g} s to {high / 3600:g} h")
    return seconds


def cmd_failover(args: argparse.Namespace) -> int:
    from agent.shared.failover_mark import FailoverMark
    from agent.shared.fsutil import atomic_write
    from server.process.failover import mark_images, materialise
    from server.process.interrupts import interruptible
    from server.progress import progress_for

    wait = _bounded_duration(args.wait, "--wait", 1, 86400)
    data, store, machine = _open(args)
    marked: dict[str, Any] | None = None
    try:
        point = store.resolve_point(machine.host_id, args.point)
        mark = FailoverMark("failover", point.host_id, point.point_id, point.created, time.time())

        def finish(images: list[Path]) -> None:
            nonlocal marked
            if not args.no_mark:
                marked = mark_images(images, mark, _scratch(args, data), wait)

        with interruptible("failover"), progress_for(args.json) as progress:
            images = materialise(store, point, Path(args.out), progress, fmt=args.format, finish=finish)
    finally:
        store.close()
    doc = {
        **_point_json(point),
        "format": args.format,
        "images": [str(i) for i in images],
        "mark": marked or {"marked": False, "why": "--no-mark", "smbios": mark.smbios()},
    }
    atomic_write(Path(args.out) / "point.json", (json.dumps(doc, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"point {point.point_id} ({point.consistency}, {_stamp(point.created)}), {args.format}:")
        for image in images:
            print(f"  {image}")
        m = doc["mark"]
        if m["marked"]:
            print(f"marked as a failover of {point.host_id}: {m['file']} on {m['filesystem']}")
        else:
            print(f"not marked ({printable(str(m.get('why', '')), 300)})")
        print(f"hypervisor SMBIOS OEM string (type 11) that marks it too: {mark.smbios()}")
    return Exit.OK


def cmd_test_failover(args: argparse.Namespace, inspect: Inspect | None = None) -> int:
    """``inspect``: for a program that runs the command in its own process (the demo), called with each filesystem
    while it is mounted read-only in the appliance, to read files through it (server/process/testfailover.py)."""
    from server.process.interrupts import interruptible
    from server.process.testfailover import BootOptions, run_test_failover
    from server.progress import progress_for

    wait = _bounded_duration(args.wait, "--wait", 1, 86400)
    boot = None
    if args.boot:
        boot = BootOptions(
            memory_mib=args.memory,
            cpus=args.cpus,
            bus=args.bus,
            boot_timeout=_bounded_duration(args.boot_timeout, "--boot-timeout", 10, 86400),
            check_timeout=int(_bounded_duration(args.check_timeout, "--check-timeout", 1, 86400)),
        )
    data, store, machine = _open(args)
    point: Point | None = None
    try:
        point = store.resolve_point(machine.host_id, args.point)
        with interruptible("test-failover"), progress_for(args.json) as progress:
            report = run_test_failover(
                store,
                point,
                _scratch(args, data),
                keep=args.keep,
                boot=boot,
                inspect=inspect,
                progress=progress,
                wait=wait,
            )
    except MobilityError as e:
        if point is not None:  # it ran and was stopped: its result is recorded like any other
            _record_test_failover(args, data, machine, point, None, e)
        raise
    finally:
        store.close()
    _record_test_failover(args, data, machine, point, report, None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_test_failover(point, report)
    if not report["ok"]:
        if report.get("error") == PointCorrupt.code:
            raise PointCorrupt(str(report["message"]))
        if report.get("error") == FailoverNotBootable.code:
            raise FailoverNotBootable(str(report["message"]))
        raise TestFailoverFailed(f"point {point.point_id} did not pass its test failover")
    return Exit.OK


def _print_test_failover(point: Point, report: dict[str, Any]) -> None:
    how = "booted" if report["mode"] == "boot" else "inspected in the appliance"
    print(
        f"test failover of point {point.point_id} ({point.consistency}, {_stamp(point.created)}), {how} under "
        f"{report['accelerator']}:"
    )
    if report.get("error"):
        print(f"  {report['error']}: {printable(str(report['message']), 500)}")
    for step in report["steps"]:
        state = "ok" if step["ok"] else "FAILED"
        print(f"  {step['step'][:40]:40} {step['seconds']:8.1f} s  {state}  {printable(step['detail'], 300)}")
        if not step["ok"] and step.get("output"):
            for line in str(step["output"]).strip().splitlines()[-10:]:
                print(f"      | {printable(line, 200)}")
        if not step["ok"] and step.get("console"):
            print("    the console's last lines:")
            for line in str(step["console"]).strip().splitlines()[-15:]:
                print(f"      | {printable(line, 200)}")
    for d in report["disks"]:
        print(f"  {d['disk']}: root hash {d['root_hash']}")
        for fs in d["filesystems"]:
            print(f"    {_fs_line(fs)}")
    for fs in report["volumes"]:
        print(f"  volume {_fs_line(fs)}")
    if report.get("rto_seconds") is not None:
        print(f"  multi-user.target {report['rto_seconds']:.1f} s after the command started")
    for what in report.get("left_behind", []):
        print(f"  NOT RELEASED: {what}")
    if report.get("vm"):
        vm = report["vm"]
        print(f"  the VM runs on (pid {vm['pid']}): console {vm['console']}")
        print(f"    attach: {vm['attach']}    stop: {vm['stop']}")
    if report.get("scratch"):
        print(f"  kept: {report['scratch']} (remove it when done)")
    print("PASSED" if report["ok"] else "FAILED")


def _fs_line(fs: dict[str, Any]) -> str:
    return (
        f"{fs['device']} {fs['fstype']}: journal replay {fs['replay']}, fsck {fs['fsck']}, mount {fs['mount']}"
        f"{', ' + str(fs['entries']) + ' entries' if fs['mount'] == 'ok' else ''} {printable(fs['detail'], 300)}"
    ).rstrip()


def _record_test_failover(
    args: argparse.Namespace,
    data: DataDir,
    machine: Machine,
    point: Point,
    report: dict[str, Any] | None,
    error: MobilityError | None,
) -> None:
    """A test failover's result as a job of the machine (kind ``test-failover``): the dashboard's list of them, and
    `mobility-server jobs`, show every one, whether started there or here."""
    lines = [f"point {point.point_id} ({point.consistency}, {_stamp(point.created)})"]
    error_id = error.id if error else None
    remediation = error.fix if error else None
    if report is not None:
        if report.get("error"):
            error_id, remediation = str(report["error"]), PointCorrupt.remediation
            lines.append(str(report.get("message", "")))
        elif not report["ok"]:
            error_id, remediation = TestFailoverFailed.code, TestFailoverFailed.remediation
        if report.get("error") == FailoverNotBootable.code:
            remediation = FailoverNotBootable.remediation
        for d in report["disks"]:
            checks = "; ".join(f"{fs['fstype']}: fsck {fs['fsck']}, mount {fs['mount']}" for fs in d["filesystems"])
            lines.append(f"{d['disk']}: root hash {d['root_hash']}{'; ' + checks if checks else ''}")
        lines += [f"{fs['device']} {fs['fstype']}: fsck {fs['fsck']}, mount {fs['mount']}" for fs in report["volumes"]]
        lines += [f"{s['step']} {'ok' if s['ok'] else 'FAILED'} ({s['seconds']:.1f} s)" for s in report["steps"]]
        lines += [f"not released: {what}" for what in report.get("left_behind", [])]
    elif error is not None:
        lines.append(error.message)
    storage = open_storage(args, data)
    try:
        storage.record_job(
            job_id=None,
            host_id=machine.host_id,
            hostname=machine.hostname,
            kind="test-failover",
            state="succeeded" if report is not None and report["ok"] else "failed",
            error_id=error_id,
            remediation=remediation,
            detail=printable(" · ".join(lines), 4000),
            now=time.time(),
        )
    finally:
        storage.close()


def cmd_verify(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from server.errors import PointNotFound
    from server.process.failover import verify_point
    from server.process.service import store_dir
    from server.process.store import ChunkStore
    from server.progress import progress_for

    store = ChunkStore(store_dir(data))
    try:
        point = store.find_point(args.point)
        if point is None or not point.complete:
            raise PointNotFound(f"no complete point {args.point!r}")
        with progress_for(args.json) as progress:
            report = verify_point(store, point, progress)
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for d in report["disks"]:
            print(
                f"{d['disk']}: root {d['root'][:16]}... verified ({d['stored_chunks']} of {d['chunks']} chunks stored)"
            )
        print(f"point {point.point_id}: OK")
    return Exit.OK


def cmd_store(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from server.errors import RepairPartial
    from server.process.repair import described, repair
    from server.process.service import store_dir

    done = repair(store_dir(data), rebuild=args.rebuild)
    if args.json:
        print(json.dumps(done.to_json(), indent=2))
    else:
        print(f"store {store_dir(data)}:")
        for line in described(done):
            print(line)
    if done.not_restored:
        raise RepairPartial(f"{len(done.not_restored)} points or records were not restored (listed above)")
    return Exit.OK


_STORE_HELP = """\
`store repair` checks the chunk store's index (DATA/process/index.db) against what it describes: the packs (every
chunk record carries its hash, codec and lengths), the manifests and the point records (DATA/process/points/, one
per point and disk, written before the point was acknowledged). A healthy index is kept as it is (repair only writes
a record a point lacks and corrects wrong reference counts). A missing or damaged index is rebuilt from those files
(the old one is kept beside it, renamed): every chunk record is read and verified; each point whose records, manifests
and chunks are whole is restored; each disk's replica becomes its newest point, and its agent, told so at its next
connection, resyncs by checksums (sending only what changed since that point). Points that cannot be restored are
listed (PS-REPAIR-PARTIAL) and their records kept. Stop the process server first: repair takes the store's writer
lock (PS-STORE-BUSY otherwise)."""


def add_commands(command: Command) -> None:
    """Register the replication commands on `mobility-server` (``command(name, help)`` adds --data)."""

    p = command("protect", "protect disks of a machine (replicated to the process server, recovery points)")
    p.add_argument("--machine", required=True, metavar="HOST", help="host ID or hostname")
    p.add_argument("--disk", action="append", metavar="/dev/X", help="a whole disk to protect (repeatable)")
    p.add_argument("--all-disks", action="store_true", help="every disk of the machine")
    p.add_argument("--policy", metavar="NAME", help="the policy (default: as before, or `default`)")
    pause = p.add_mutually_exclusive_group()
    pause.add_argument("--pause", dest="pause", action="store_const", const=True, help="track changes, send nothing")
    pause.add_argument("--resume", dest="pause", action="store_const", const=False, help="send again")
    p.set_defaults(func=cmd_protect)

    p = command("unprotect", "stop protecting a machine (its recovery points are kept)")
    p.add_argument("--machine", required=True, metavar="HOST")
    p.set_defaults(func=cmd_unprotect)

    p = command("protection", "protected machines: each disk's state, what is left, lag, throughput, ETA")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_protection)

    p = command("policy", "list or set replication policies (RPO, point interval, bandwidth cap, retention)")
    p.add_argument("action", choices=("list", "set"))
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--rpo", metavar="DURATION", help="the recovery point objective, e.g. 15m")
    p.add_argument("--interval", metavar="DURATION", help="a recovery point every ..., e.g. 5m (default)")
    p.add_argument("--bandwidth", metavar="SIZE", help="cap per disk in bytes per second, e.g. 50M (0: none)")
    p.add_argument("--retention", type=int, metavar="N", help="recovery points kept (the newest N)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy)

    p = command("points", "a machine's recovery points")
    p.add_argument("--machine", required=True, metavar="HOST")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_points)

    p = command("failover", "write a point's disk images into a directory, marked as a failover, for a hypervisor")
    p.add_argument("--machine", required=True, metavar="HOST")
    p.add_argument("--point", required=True, metavar="ID|latest")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")
    p.add_argument("--format", choices=("raw", "qcow2", "vmdk", "vhd"), default="raw", help="vhd: fixed-size")
    p.add_argument("--no-mark", action="store_true", help="the point's bytes exactly: no failover mark written")
    p.add_argument("--scratch", metavar="DIR", help="where marking works (default DATA/process/scratch)")
    p.add_argument("--wait", default="1h", metavar="DURATION", help="for a free VM slot (default 1h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failover)

    p = command(
        "test-failover", "test a point in a throwaway VM: its filesystems checked, or (--boot) the machine booted"
    )
    p.add_argument("--machine", required=True, metavar="HOST")
    p.add_argument("--point", required=True, metavar="ID|latest")
    p.add_argument("--boot", action="store_true", help="boot it (no network), run /etc/mobility/recovery.d checks")
    p.add_argument("--keep", action="store_true", help="keep the scratch area; with --boot the VM runs on")
    p.add_argument("--memory", type=count(256, 65536), default=1024, metavar="MIB", help="--boot: RAM (1024)")
    p.add_argument("--cpus", type=count(1, 16), default=1, metavar="N", help="--boot: CPUs (1)")
    p.add_argument("--bus", choices=("virtio", "scsi", "sata"), default="virtio", help="--boot: the disks' bus")
    p.add_argument("--boot-timeout", default="15m", metavar="DURATION", help="--boot: to multi-user.target")
    p.add_argument("--check-timeout", default="10m", metavar="DURATION", help="--boot: per recovery check")
    p.add_argument("--scratch", metavar="DIR", help="where (default DATA/process/scratch)")
    p.add_argument("--wait", default="1h", metavar="DURATION", help="for a free VM slot (default 1h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_test_failover)

    p = command("store", "check the chunk store's index and rebuild it when it is missing or damaged")
    p.description = _STORE_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("action", choices=("repair",))
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the index from the packs and records even when it looks healthy (e.g. an index older than "
        "its store, restored from a backup)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_store)

    p = command("verify", "recompute a point's root hash from the chunk store")
    p.add_argument("--point", required=True, metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
