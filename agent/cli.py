"""The `mobility` command line: parse, dispatch, and turn every MobilityError into one clear message."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.errors import AgentNotInstalled, ConfirmationRequired, PrerequisitesFailed, RootRequired
from agent.host.distros import detect_os, require_supported
from agent.host.paths import Paths
from agent.lifecycle.check_report import Status, render, run_checks
from agent.lifecycle.install_dir import parse_install_dir
from agent.lifecycle.prereq import DEFAULT_INSTALL_DIR
from agent.shared import timefmt
from agent.shared.cli import Parser, report_error, run
from agent.shared.errors import BadArguments, Exit, MobilityError
from agent.shared.wire import PLATFORMS, ROLES

if TYPE_CHECKING:
    from agent.replication.frozen import ThawReport


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_detect_os(args: argparse.Namespace) -> int:
    info = detect_os(Paths.checked(args.root))
    try:
        require_supported(info)
    except MobilityError as e:
        # A refused tag is still named (stdout, as for any tag), then refused like an unsupported system (exit 3).
        _emit(args, {**info.to_json(), "error": e.to_json()}, info.os_tag)
        print(e.diagnostics(), file=sys.stderr)
        return int(e.exit_code)
    _emit(args, info.to_json(), info.os_tag)
    return Exit.OK


def cmd_prereq(args: argparse.Namespace) -> int:
    from agent.lifecycle.prereq.prerequisites import prerequisite_checks

    paths = Paths.checked(args.root)
    report = run_checks(prerequisite_checks(paths, args.install_dir, args.kernel_floor))
    data = {
        "ok": not report.failed,
        "worst": report.worst.value,
        "checks": [r.to_json() for r in report.results],
    }
    _emit(args, data, render(report))
    if report.failed:
        failed = ", ".join(r.id for r in report.results if r.status is Status.FAIL)
        # The report (JSON or table) is already on stdout: only the one-line error goes to stderr.
        return report_error(PrerequisitesFailed(f"prerequisite checks failed: {failed}"), json_out=False)
    return Exit.OK


def cmd_configure(args: argparse.Namespace) -> int:
    from agent.lifecycle.api_client import parse_fingerprint
    from agent.lifecycle.failover import detect as detect_failover
    from agent.lifecycle.registration import configure
    from agent.shared.secretfile import read_secret_file

    paths = Paths.checked(args.root)
    pinned = parse_fingerprint(args.cs_fingerprint) if args.cs_fingerprint else None
    secret = read_secret_file(Path(args.passphrase_file))
    os_tag = detect_os(paths).os_tag
    failover = detect_failover(paths, time.time())
    result = configure(paths, args.server, secret, pinned, args.role, args.platform, os_tag, failover=failover)
    reg = result.registration
    data = {
        "host_id": reg.host_id,
        "server": reg.server,
        "fingerprint": reg.fingerprint,
        "cloned_from": reg.cloned_from,
        "failover_of": reg.failover_of,
        "already_registered": result.reused,
    }
    what = "already registered" if result.reused else "registered"
    clone = f" (a clone of {reg.cloned_from})" if reg.cloned_from else ""
    if reg.failover_of:
        clone = f" (a failover of {reg.failover_of})"
    _emit(args, data, f"{what} with {reg.server} as host {reg.host_id}{clone}")
    return Exit.OK


def _ask(question: str, choices: tuple[str, ...]) -> str:
    """One question on the terminal, repeated until the answer is one of ``choices``."""
    for _ in range(5):
        answer = input(f"{question} [{'/'.join(choices)}]: ").strip()
        match = next((c for c in choices if c.lower() == answer.lower()), None)
        if match:
            return match
        print(f"please answer one of {', '.join(choices)}", file=sys.stderr)
    raise BadArguments(f"no valid answer to {question!r}")


def cmd_install(args: argparse.Namespace) -> int:
    from agent.lifecycle.install import install

    interactive = not args.quiet and sys.stdin.isatty()
    for attr, question, choices in (
        ("role", "Role of this machine: MS (mobility service) or MT (master target)?", ROLES),
        ("platform", "Platform: VmWare (VMware VMs, physical) or Azure?", PLATFORMS),
    ):
        if getattr(args, attr) is None:
            if not interactive:
                flag = "-r" if attr == "role" else "-v"
                raise BadArguments(f"install: {flag} is required (or run it on a terminal without -q to be asked)")
            setattr(args, attr, _ask(question, choices))
    result = install(Paths.checked(args.root), Path(args.bundle), args.install_dir, args.role, args.platform)
    data: dict[str, object] = {
        "version": result.version,
        "os_tag": result.os_tag,
        "install_dir": result.install_dir,
        "previous": result.previous,
        "checks": [r.to_json() for r in result.report.results],
        "freeze_provider": {"ready": result.freeze.ready, "reason": result.freeze.reason},
    }
    text = f"installed Mobility {result.version} for {result.os_tag} in {result.install_dir}"
    if not result.freeze.ready:
        text += f"\nwarning: freeze provider not set up ({result.freeze.reason}): only crash-consistent points"
    if not args.quiet:
        text = render(result.report) + "\n" + text
    _emit(args, data, text)
    return Exit.OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    from agent.lifecycle.install import uninstall

    if not args.yes:
        raise ConfirmationRequired("uninstall removes the agent, its registration, state and logs")
    done = uninstall(Paths.checked(args.root))
    text = "removed " + (", ".join(done.removed) if done.removed else "nothing (not installed)")
    text += "".join(f"\n{note}" for note in done.kept)
    _emit(args, {"removed": done.removed, "kept": done.kept}, text)
    return Exit.OK


def _require_root(args: argparse.Namespace) -> Paths:
    if os.geteuid() != 0:
        raise RootRequired(f"`mobility {args.command}` reads the agent's private state")
    return Paths.checked(args.root)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.config import load_config
    from agent.daemon.loop import Daemon, ServerLink
    from agent.daemon.sdnotify import Notifier

    paths = Paths.checked(args.root)
    thawed = _thaw_left_frozen(paths)  # first: a log line on a filesystem a killed agent left frozen would block
    _daemon_logging(paths)
    _log_thawed(thawed)
    daemon = Daemon(
        paths,
        load_config(paths),
        ServerLink(paths),
        now=time.time(),
        notifier=Notifier(os.environ.get("NOTIFY_SOCKET")),
    )
    return daemon.run_forever()


def _thaw_left_frozen(paths: Paths) -> ThawReport:
    from agent.replication.frozen import thaw_recorded

    return thaw_recorded(paths)


def _log_thawed(report: ThawReport) -> None:
    import logging

    from agent.errors import ThawFailed
    from agent.shared.textsafe import printable

    log = logging.getLogger("mobility.daemon")
    if report.thawed:
        log.warning(
            "thawed %s: an agent that ended inside a point's freeze left them frozen",
            ", ".join(printable(p) for p in report.thawed),
        )
    if report.failed:
        e = ThawFailed("; ".join(printable(f) for f in report.failed))
        log.error("%s: %s", e.id, e.message)


def cmd_thaw(args: argparse.Namespace) -> int:
    """The unit's ExecStopPost: thaw what a point froze, if the daemon ended inside the freeze. Needs nothing from
    the daemon and writes nothing before the thaw (no log file, no state: they may be on a frozen filesystem)."""
    from agent.errors import ThawFailed
    from agent.replication.frozen import thaw_recorded
    from agent.shared.textsafe import printable

    if not 0 < args.timeout <= 300:
        raise BadArguments("--timeout must be between 0 and 300 seconds")
    report = thaw_recorded(_require_root(args), timeout=args.timeout)
    if report.failed:
        raise ThawFailed("cannot thaw " + "; ".join(printable(f) for f in report.failed))
    if report.thawed:
        text = "thawed " + ", ".join(printable(p) for p in report.thawed)
    elif report.owner_alive:
        text = "a recovery point is freezing now: its own thaw comes within seconds"
    elif report.recorded:
        text = "nothing was frozen any more"
    else:
        text = "nothing frozen by the agent"
    _emit(args, report.to_json(), text)
    return Exit.OK


def _daemon_logging(paths: Paths) -> None:
    """/var/log/mobility/agent.log with rotation, and stdout when that is the journal or a terminal. Elsewhere stdout
    is a file (the SysV script's agent.log, the upgrade watcher's daemon.out), which keeps what does not go through
    logging, such as a crash at start: the log's lines would only repeat agent.log there, without its rotation."""
    import logging  # the daemon's only: logging.handlers imports socket and more, which the bootstrapper's no-op skips

    from agent.daemon.logfile import AgentLog

    paths.log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [AgentLog(paths.agent_log, maxBytes=1 << 20, backupCount=3)]
    if _stdout_is_journal_or_terminal():
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(fmt)
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def _stdout_is_journal_or_terminal() -> bool:
    """systemd names the journal stream it connected a service's stdout to (JOURNAL_STREAM, "DEVICE:INODE")."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    if os.isatty(sys.stdout.fileno()):
        return True
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _require_installed(paths: Paths) -> None:
    """status and health describe an installed agent: on a machine without one, say so (exit 3, as monitoring
    plugins report UNKNOWN), instead of failing checks whose fixes assume an agent."""
    from agent.daemon.config import load_config
    from agent.lifecycle.identity import load_registration
    from agent.lifecycle.installed import load_install_record

    load_config(paths)  # a broken mobility.conf is its own error, installed or not
    if load_install_record(paths) is None and load_registration(paths) is None:
        raise AgentNotInstalled("Mobility is not installed on this machine (no install record, not registered)")


def cmd_status(args: argparse.Namespace) -> int:
    from agent.daemon.status_commands import local_status

    paths = _require_root(args)
    _require_installed(paths)
    data = local_status(paths)
    job = data["last_job"] or {}
    lines = [
        f"version:        {data['version']}"
        + (f" (update available: {data['update_available']})" if data["update_available"] else ""),
        f"host ID:        {data['host_id'] or '-'}"
        + (f" (clone of {data['cloned_from']})" if data["cloned_from"] else "")
        + (f" (failover of {data['failover_of']})" if data["failover_of"] else ""),
        f"role/platform:  {data['role'] or '-'} / {data['platform'] or '-'}",
        f"server:         {data['server'] or '-'} ({data['registration']})",
        f"daemon:         {data['daemon']}, health {data['health'] or 'unknown'}",
        f"last heartbeat: {timefmt.shown(data['last_heartbeat'])}"
        + (
            f"; server unreachable since {timefmt.shown(data['server_unreachable_since'])}, "
            f"{data['backlog']} reports queued"
            if data["server_unreachable_since"]
            else ""
        ),
        f"last job:       {job.get('kind', '-')} {job.get('state', '')}".rstrip(),
        f"freeze:         {'ready' if data['freeze_provider']['ready'] else 'not set up'}: "
        f"{data['freeze_provider']['reason']}",
    ]
    if data["failover"]:
        lines.append(f"failover:       {_failover_line(data['failover'], data['host_id'])}")
    if data["target"]:
        pinned = " (pinned)" if data["target"]["pinned"] else ""
        lines.append(f"target:         {data['target']['version']}{pinned}, as the server names it")
    if data["upgrade"]:
        up = data["upgrade"]
        why = (up.get("outcome") or {}).get("error_id")
        lines.append(
            f"last upgrade:   {up['from_version']} -> {up['to_version']}: {up['phase']}" + (f" ({why})" if why else "")
        )
    from agent.replication.local_commands import local_replication, status_lines

    data["replication"] = local_replication(Paths.checked(args.root))
    lines += status_lines(data["replication"])
    _emit(args, data, "\n".join(lines))
    return Exit.OK


def _failover_line(doc: dict[str, object], host_id: object) -> str:
    what = "a test failover" if doc["kind"] == "test" else "a failover"
    line = f"{what} of {doc['source_host'] or 'an unregistered machine'} at point {doc['point_id']}"
    if doc["kind"] == "test":
        return line + ": nothing of it reaches the server"
    if host_id is not None and host_id == doc["source_host"]:
        return line + ": silent until the bootstrapper registers it as a machine of its own"
    return line + f", registered as {host_id}"


def cmd_point(args: argparse.Namespace) -> int:
    from agent.replication.local_commands import request_point

    result = request_point(_require_root(args), timeout=args.timeout)
    frozen = "; ".join(f"{m['mount']} ({m['type']} on {', '.join(m['disks'])})" for m in result.get("frozen", []))
    text = (
        f"point {result['point_id']} ({result['consistency']}): froze {frozen or 'no filesystem'} for "
        f"{result['freeze_ms']} ms, {result['residual_chunks']} residual chunks"
    )
    _emit(args, result, text)
    return Exit.OK


def cmd_recovery_check(args: argparse.Namespace) -> int:
    from agent.errors import NotAFailover, RecoveryCheckFailed
    from agent.lifecycle.failover import detect
    from agent.recovery.builtins import BUILTINS
    from agent.recovery.runner import Outcome, render, run_recovery_checks

    if not 1.0 <= args.timeout <= 86400.0:  # NaN too
        raise BadArguments(f"--timeout {args.timeout:g}: give 1 to 86400 seconds")
    if args.builtin is not None and args.builtin not in BUILTINS:
        raise BadArguments(f"--builtin {args.builtin!r}: the built-in checks are {', '.join(sorted(BUILTINS))}")
    paths = _require_root(args)
    failover = detect(paths, time.time())
    if failover is None and not args.here:
        raise NotAFailover("this machine is not a failover (no failover mark from its hypervisor or in its image)")
    if args.builtin is not None:
        result = BUILTINS[args.builtin]().run(paths, args.timeout)
        text = "\n".join([f"{result.outcome.value}: {result.summary}", *([result.output] if result.output else [])])
        _emit(args, result.to_json(), text)
        if result.outcome is Outcome.FAILED:
            return report_error(RecoveryCheckFailed(f"{args.builtin}: {result.summary}"), json_out=False)
        return Exit.OK
    report = run_recovery_checks(paths, failover, timeout=args.timeout, only=args.only or ())
    _emit(args, report.to_json(), render(report))
    if report.failed:
        return report_error(RecoveryCheckFailed(f"recovery checks failed: {', '.join(report.failed)}"), json_out=False)
    return Exit.OK


def cmd_health(args: argparse.Namespace) -> int:
    from agent.daemon.status_commands import local_health

    paths = _require_root(args)
    _require_installed(paths)
    health, report = local_health(paths)
    data = {"status": health.label, "checks": [r.to_json() for r in report.results]}
    _emit(args, data, render(report) + f"\nhealth: {health.label.upper()}")
    return int(health)


def cmd_diagnostics(args: argparse.Namespace) -> int:
    from agent.daemon.diagnostics import collect
    from agent.daemon.status_commands import local_health

    paths = _require_root(args)
    health, report = local_health(paths)
    out = Path(args.output or f"mobility-diagnostics-{int(time.time())}.tar.gz")
    names = collect(paths, {"status": health.label, "checks": [r.to_json() for r in report.results]}, out)
    _emit(args, {"path": str(out), "members": names}, f"wrote {out} ({len(names)} files, secrets redacted)")
    return Exit.OK


def cmd_freeze_provider(args: argparse.Namespace) -> int:
    from agent.lifecycle.freeze import install_provider

    setup = install_provider(Paths.checked(args.root))
    _emit(
        args,
        {"ready": setup.ready, "reason": setup.reason},
        f"freeze provider {'ready' if setup.ready else 'not set up'}: {setup.reason}",
    )
    return Exit.OK if setup.ready else Exit.ERROR


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from agent.lifecycle.bootstrap import bootstrap
    from agent.lifecycle.bootstrap_conf import merged_settings

    paths = Paths.checked(args.root)
    flags = {
        "server": args.server,
        "passphrase_file": args.passphrase_file,
        "fingerprint": args.cs_fingerprint,
        "install_dir": args.install_dir,
        "role": args.role,
        "platform": args.platform,
        "retry_for": args.retry_for,
        "bundle": args.bundle,
        "job_id": _job_id(args.job_id),
    }
    outcome = bootstrap(paths, merged_settings(paths, flags))
    data = {"state": outcome.state, "message": outcome.message, "host_id": outcome.host_id, "job_id": outcome.job_id}
    _emit(args, data, f"{outcome.state}: {outcome.message}")
    return Exit.OK


def _job_id(text: str | None) -> str | None:
    import uuid

    if text is None:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError as e:
        raise BadArguments(f"--job-id {text!r} is not a UUID") from e


def cmd_upgrade(args: argparse.Namespace) -> int:
    from agent.host.runtime import self_command
    from agent.update.watcher import upgrade

    paths = _require_root(args)
    result = upgrade(paths, again=self_command(sys.argv[1:]))
    record = result.record
    data = {"state": result.state, "message": result.message, "record": record.to_json() if record else None}
    _emit(args, data, f"{result.state}: {result.message}")
    if result.state == "postponed":
        return Exit.TEMPFAIL
    if result.state in ("rolled back", "failed") and record is not None and record.outcome is not None:
        outcome = record.outcome
        print(f"error {outcome.error_id or 'UPDATE-FAILED'}: {outcome.message.splitlines()[0]}", file=sys.stderr)
        if outcome.remediation:
            print(f"  fix: {outcome.remediation}", file=sys.stderr)
        return Exit.ERROR
    return Exit.OK


def cmd_template_prep(args: argparse.Namespace) -> int:
    from agent.lifecycle.template import template_prep

    done = template_prep(_require_root(args))
    text = "removed " + (", ".join(done.removed) if done.removed else "nothing: no identity found")
    _emit(args, {"stopped_daemon": done.stopped_daemon, "removed": done.removed}, text)
    return Exit.OK


def add_bootstrap_flags(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("-i", dest="server", metavar="HOST[:PORT]", help="configuration server (or `server` in the conf)")
    p.add_argument("-P", dest="passphrase_file", metavar="FILE", help="passphrase or token file, mode 0600")
    p.add_argument("--cs-fingerprint", metavar="sha256:HEX", help="the server CA's fingerprint to pin")
    p.add_argument(
        "-d",
        dest="install_dir",
        type=parse_install_dir,
        metavar="DIR",
        help=f"install directory (default {DEFAULT_INSTALL_DIR})",
    )
    p.add_argument("-r", dest="role", choices=ROLES, help="MS (default) or MT")
    p.add_argument("-v", dest="platform", choices=PLATFORMS, help="VmWare (default) or Azure")
    p.add_argument(
        "--retry-for",
        type=float,
        metavar="SECONDS",
        help="how long to retry an unreachable server before exiting 75 (default 120)",
    )
    p.add_argument(
        "--bundle",
        metavar="DIR",
        help="install this unpacked bundle instead of fetching one (push install copies it over SFTP)",
    )
    p.add_argument("--job-id", metavar="UUID", help="report under this job, created by the server (push install)")
    p.set_defaults(func=cmd_bootstrap)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help="root of the system to act on (default /), as dpkg --root")
    p.add_argument("--json", action="store_true", help="print data as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mobility", description="Mobility agent: protect this Linux machine.")
    parser.add_argument("--version", action="version", version=f"mobility {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("detect-os", help="print the OS tag of the system (exit 3 if unsupported)")
    _common(p)
    p.set_defaults(func=cmd_detect_os)

    p = sub.add_parser("prereq", help="run the prerequisite checks (exit 3 if any fails)")
    _common(p)
    p.add_argument(
        "-d",
        "--install-dir",
        default=DEFAULT_INSTALL_DIR,
        type=parse_install_dir,
        metavar="DIR",
        help=f"where the agent will be installed (default {DEFAULT_INSTALL_DIR})",
    )
    p.add_argument(
        "--kernel-floor",
        metavar="X.Y",
        help="oldest kernel the bundle's C library runs on (default: that of the C library this agent runs on)",
    )
    p.set_defaults(func=cmd_prereq)

    p = sub.add_parser("configure", help="register this machine with a configuration server")
    _common(p)
    p.add_argument("-i", dest="server", required=True, metavar="HOST[:PORT]", help="the configuration server")
    p.add_argument(
        "-P",
        dest="passphrase_file",
        required=True,
        metavar="FILE",
        help="file holding the passphrase or an enrolment token (mode 0600)",
    )
    p.add_argument("--cs-fingerprint", metavar="sha256:HEX", help="the server CA's fingerprint to pin")
    p.add_argument("-r", dest="role", choices=ROLES, default="MS", help="role (default MS)")
    p.add_argument("-v", dest="platform", choices=PLATFORMS, default="VmWare", help="platform (default VmWare)")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("install", help="install the agent from an unpacked bundle (the bundle's ./install)")
    _common(p)
    p.add_argument("--bundle", required=True, metavar="DIR", help="the unpacked bundle (holds bundle.json)")
    p.add_argument(
        "-d",
        dest="install_dir",
        default=DEFAULT_INSTALL_DIR,
        type=parse_install_dir,
        metavar="DIR",
        help=f"install directory (default {DEFAULT_INSTALL_DIR}; a directory of its own: not a system one)",
    )
    p.add_argument(
        "-r", dest="role", choices=ROLES, help="MS (mobility service) or MT (master target); asked if absent"
    )
    p.add_argument("-v", dest="platform", choices=PLATFORMS, help="VmWare (and physical) or Azure; asked if absent")
    p.add_argument("-q", dest="quiet", action="store_true", help="non-interactive, no check table")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("run", help="the daemon (under systemd, or in the foreground)")
    p.add_argument("--root", metavar="DIR", help="root of the system (default /)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("thaw", help="thaw filesystems a point left frozen (the unit's ExecStopPost; every start)")
    _common(p)
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="how long to wait (default 5)")
    p.set_defaults(func=cmd_thaw)

    p = sub.add_parser("status", help="version, identity, server, registration, last heartbeat and job")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("point", help="cut a crash-consistent recovery point of the protected disks now")
    _common(p)
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="how long to wait (default 300)")
    p.set_defaults(func=cmd_point)

    p = sub.add_parser(
        "recovery-check",
        help="in a failed-over machine: run the recovery checks of /etc/mobility/recovery.d/; exit 1 if any fails",
    )
    _common(p)
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="per check (default 600)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this check (repeatable)")
    p.add_argument("--here", action="store_true", help="run them although this machine is not a failover")
    p.add_argument("--builtin", metavar="NAME", help="run only the agent's own check NAME (postgresql)")
    p.set_defaults(func=cmd_recovery_check)

    p = sub.add_parser("health", help="all health checks; exit 0 healthy, 1 warning, 2 critical, 3 unknown")
    _common(p)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("diagnostics", help="a tarball of logs, config, state, health; secrets redacted")
    _common(p)
    p.add_argument("-o", "--output", metavar="FILE", help="where to write it (default ./mobility-diagnostics-*.tar.gz)")
    p.set_defaults(func=cmd_diagnostics)

    p = sub.add_parser("bootstrap", help="the whole lifecycle: detect, fetch, verify, install, register, start")
    add_bootstrap_flags(p)

    p = sub.add_parser(
        "upgrade",
        help="move to the version the server names, watch its health, roll back if it fails (the daemon runs it)",
    )
    _common(p)
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser(
        "template-prep",
        help="stop the daemon, strip identity, state, logs and the machine-id before capturing an image",
    )
    _common(p)
    p.set_defaults(func=cmd_template_prep)

    p = sub.add_parser("freeze-provider", help="set up the freeze provider (hooks directory, FIFREEZE check)")
    _common(p)
    p.add_argument("action", choices=("install",))
    p.set_defaults(func=cmd_freeze_provider)

    p = sub.add_parser("uninstall", help="remove the agent, its state and its logs")
    _common(p)
    p.add_argument("-Y", dest="yes", action="store_true", help="confirm")
    p.set_defaults(func=cmd_uninstall)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    """`mobility-bootstrap`: the binary baked into templates."""
    parser = Parser(
        prog="mobility-bootstrap",
        description="Mobility bootstrapper, run at boot from a VM template (see `mobility --help`).",
    )
    parser.add_argument("--version", action="version", version=f"mobility-bootstrap {__version__}")
    add_bootstrap_flags(parser)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
