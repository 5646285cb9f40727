"""The `mobility-server` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.host.distros import BY_TAG
from agent.shared import timefmt, wire
from agent.shared.cli import Parser, run
from agent.shared.errors import BadArguments, Exit
from agent.shared.fsutil import NotSmallRegularFile, atomic_write, read_small_file
from agent.shared.textsafe import printable, shown
from server import __version__
from server.commandline import (
    count,
    data_dir,
    open_database,
    open_storage,
    parse_duration,
    parse_size,
    print_table,
    seconds,
)
from server.datadir import DEFAULT_DATA_DIR, DataDir
from server.errors import (
    DatabaseNotEmpty,
    DataDirInitialised,
    DataDirPermissions,
    MachineNotFound,
    PushTargetInvalid,
)

if TYPE_CHECKING:  # the database and the PKI are imported where used: `--help` and the refusals start in a blink
    from server.database.connection import Database

DEFAULT_GRACE = "24h"
# The bounds of the numeric flags (tests/security/test_server_commands.py gives each one values past them).
MAX_HEARTBEAT_INTERVAL = 3600.0
MAX_CONNECTIONS = 1 << 20  # the most open files a process gets here (server/api/app.py: connection_limit)
MAX_TOKEN_USES = 10**9
MAX_FLEET = 10**6  # machines: a rollout's failures, a wave's size
MAX_PUSH_PARALLEL = 1000
DEFAULT_PROCESS_PORT = 9444
MAX_HOSTS_FILE = 1 << 20  # one HOST[:PORT] per line: tens of thousands of hosts


def check_permissions(data: DataDir) -> None:
    """Refuse to run on a data directory whose secrets others could read or whose files others could replace."""
    if data.root.stat().st_mode & 0o022:
        raise DataDirPermissions(f"{data.root} is writable by group or others")
    secret_files = [
        data.ca_key,
        data.tls_key,
        data.passphrase,
        data.database,
        data.nonce_key,
        *sorted((data.tuf_dir / "keys").glob("*")),
    ]
    for f in secret_files:
        if f.exists() and f.stat().st_mode & 0o077:
            raise DataDirPermissions(f"{f} is readable by group or others (mode {f.stat().st_mode & 0o777:o})")


def cmd_init(args: argparse.Namespace) -> int:
    from server.api import pki
    from server.api.nonces import load_or_create_key
    from server.database.connection import record_database
    from server.database.storage import Storage
    from server.releases.repository import Repository

    data = DataDir(Path(args.data))
    if data.initialised_marker.exists():
        raise DataDirInitialised(f"{data.root} already holds an initialised server")
    db = open_database(args, data)
    if db.postgresql or (db.sqlite_path is not None and db.sqlite_path.exists()):
        _require_empty(db)
    data.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.root.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    names = list(dict.fromkeys(args.name or [socket.gethostname(), "127.0.0.1"]))
    ca = pki.create_ca(f"Mobility CA {names[0]}", now)
    atomic_write(data.ca_key, pki.key_pem(ca.key), 0o600)
    atomic_write(data.ca_cert, pki.cert_pem(ca.cert))
    key, cert = pki.issue_server_cert(ca, names, now)
    atomic_write(data.tls_key, pki.key_pem(key), 0o600)
    atomic_write(data.tls_cert, pki.cert_pem(cert))
    atomic_write(data.passphrase, (pki.random_secret() + "\n").encode(), 0o600)
    load_or_create_key(data.nonce_key)
    Storage.open(db, create=True, pool_size=0).close()
    record_database(data, db)
    data.repository_dir.mkdir(exist_ok=True)
    Repository.create(data)
    atomic_write(data.initialised_marker, f"{__version__}\n".encode())
    print(f"initialised {data.root} for {', '.join(names)} (database {db})")
    print(f"fingerprint: {pki.fingerprint(ca.cert)}")
    return Exit.OK


def _require_empty(db: Database) -> None:
    """`init` makes a new CA: a database that already holds another server's machines is not reused by it."""
    from server.database import migrations
    from server.database.connection import make_engine

    engine = make_engine(db, pool_size=0)
    try:
        from server.database.storage import opening

        with opening(db), engine.connect() as conn:
            if migrations.current(conn) is not None:
                raise DatabaseNotEmpty(f"{db} already holds a Mobility server's tables")
    finally:
        engine.dispose()


def cmd_upgrade(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from server.api.nonces import load_or_create_key
    from server.database.storage import Storage

    check_permissions(data)
    db = open_database(args, data)
    before, after = Storage.upgrade(db)
    load_or_create_key(data.nonce_key)
    if before == after:
        print(f"database {db} is current (schema {after})")
    else:
        print(f"database {db} upgraded from schema {before} to {after}")
    return Exit.OK


def cmd_serve(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from server.api import pki
    from server.api.app import open_server, serve

    check_permissions(data)
    host, _, port = args.listen.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise BadArguments(f"--listen {shown(args.listen, 80)}: expected HOST:PORT (a port from 0 to 65535)")
    process = None
    announce_host, announce_port = _announced(args.process_address)
    if args.role in ("all", "process"):
        from server.process.service import ProcessOptions

        default_port = DEFAULT_PROCESS_PORT if int(port) else 0  # --listen on port 0 (tests): any free port
        phost, pport = _host_port(args.process_listen or f"{host}:{default_port}", "--process-listen")
        reserve = parse_size(args.store_reserve, "--store-reserve")
        process = ProcessOptions(phost, pport, reserve, announce_host, announce_port)
    elif announce_host is None:
        raise BadArguments("--role api needs --process-address HOST[:PORT]: where agents reach the process server")
    ui = _ui_options(args, port, process.reserve if process else None) if args.role != "process" else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its per-open chatter; `upgrade` prints what it did
    server = open_server(
        data,
        open_database(args, data),
        heartbeat_interval=args.heartbeat_interval,
        new_database=args.new_database,
        max_connections=args.max_connections,
        stats_interval=args.stats_interval,
    )
    fingerprint = pki.fingerprint(server.enrolment.ca.cert)

    def ready(bound: int, process_port: int | None) -> None:
        line = f"listening on {host}:{bound} fingerprint: {fingerprint}"
        if process_port is not None:
            line += f" process: {process.host if process else host}:{process_port}"
        if server.ui_address is not None:
            line += f" ui: {server.ui_address}"
        print(line, flush=True)

    import uvloop

    # libuv's loop and TLS: the same asyncio API, several times less CPU per connection and request.
    from agent.shared.replication_wire import ProcessAddress

    elsewhere = ProcessAddress(announce_host, announce_port or DEFAULT_PROCESS_PORT) if args.role == "api" else None
    uvloop.run(
        serve(
            server,
            host.strip("[]"),
            int(port),
            ready,
            process=process,
            api=args.role != "process",
            elsewhere=elsewhere,
            ui=ui,
        )
    )
    return Exit.OK


def _ui_options(args: argparse.Namespace, api_port: str, reserve: int | None) -> Any:
    """The dashboard's options from --ui-listen (``none``: no dashboard), --ui-refresh and --ui-session; its port is
    any free one when --listen's is 0 (tests), like the process server's."""
    from server.process.store import DEFAULT_RESERVE
    from server.ui.site import DEFAULT_PORT, UiOptions

    text = args.ui_listen or f"127.0.0.1:{DEFAULT_PORT if int(api_port) else 0}"
    if text == "none":
        return None
    host, port = _host_port(text, "--ui-listen")
    return UiOptions(
        host,
        port,
        refresh=args.ui_refresh,
        session_seconds=parse_duration(args.ui_session),
        database=args.database,
        reserve=reserve if reserve is not None else DEFAULT_RESERVE,
    )


def _announced(text: str | None) -> tuple[str | None, int | None]:
    """--process-address HOST[:PORT] (an IPv6 address in brackets when it has a port), checked as agents check it."""
    if text is None:
        return None, None
    from agent.shared.replication_wire import ProcessAddress
    from agent.shared.wire import WireError

    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        parsed = ProcessAddress.from_json({"host": host, "port": int(port) if port else DEFAULT_PROCESS_PORT})
    except (WireError, ValueError) as e:
        raise BadArguments(f"--process-address {text[:80]!r}: expected HOST[:PORT]") from e
    return parsed.host, parsed.port if port else None


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) < 65536:
        raise BadArguments(f"{flag} {shown(text, 80)}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def cmd_passphrase(args: argparse.Namespace) -> int:
    data = data_dir(args)
    if args.action == "rotate":
        from server.api import pki

        storage = open_storage(args, data)
        old = data.passphrase.read_text().strip()
        # Keep the old one valid first: a crash between the two steps leaves both working, never neither.
        storage.retire_passphrase(old, time.time() + parse_duration(args.grace))
        atomic_write(data.passphrase, (pki.random_secret() + "\n").encode(), 0o600)
        storage.close()
        print(f"rotated; the previous passphrase stays valid for {args.grace}", file=sys.stderr)
    print(data.passphrase.read_text().strip())
    return Exit.OK


def cmd_token(args: argparse.Namespace) -> int:
    from server.api.enrolment import create_token

    data = data_dir(args)
    ttl = parse_duration(args.ttl)
    storage = open_storage(args, data)
    try:
        _, token = create_token(storage, ttl, args.uses, time.time())
    finally:
        storage.close()
    print(token)
    return Exit.OK


def cmd_machines(args: argparse.Namespace) -> int:
    data = data_dir(args)
    if args.action != "list":
        return _change_machine(args, data)
    if args.host_id is not None:
        raise BadArguments("`machines` lists every machine; `machines remove|revoke HOST_ID` changes one")
    storage = open_storage(args, data)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for m in storage.machines():
        rows.append(
            {
                "host_id": m.host_id,
                "hostname": m.hostname,
                "os_tag": m.os_tag,
                "role": m.role,
                "platform": m.platform,
                "agent_version": m.agent_version,
                "last_seen": m.last_seen,
                "state": "revoked" if m.revoked else "online" if m.online(now) else "offline",
                "health": m.health.status if m.health else "unknown",
                "health_report": m.health.to_json() if m.health else None,
                "cloned_from": m.cloned_from,
                "failover_of": m.failover_of,
                "failover_point": m.failover_point,
                "facts": m.facts.to_json(),
                "certificate_expires": m.cert_not_after,
                "revoked": m.revoked,
                "target_version": m.target_version,
                "pinned": m.pinned_version,
                "pin_reason": m.pin_reason,
            }
        )
    storage.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return Exit.OK
    cols = (
        "host_id",
        "hostname",
        "os_tag",
        "role",
        "platform",
        "agent_version",
        "last_seen",
        "state",
        "health",
        "pinned",
        "cloned_from",
        "failover_of",
    )
    table = [[r[c] if c != "last_seen" else timefmt.shown(r[c]) for c in cols] for r in rows]
    print_table([c.upper() for c in cols], table)
    return Exit.OK


def _change_machine(args: argparse.Namespace, data: DataDir) -> int:
    if not args.host_id:
        raise BadArguments(f"`machines {args.action}` needs the HOST_ID of the machine")
    storage = open_storage(args, data)
    try:
        done = storage.revoke(args.host_id, time.time()) if args.action == "revoke" else storage.remove(args.host_id)
        if not done and (args.action == "remove" or storage.machine(args.host_id) is None):
            raise MachineNotFound(f"no machine {printable(args.host_id, 80)}")
    finally:
        storage.close()
    if args.action == "revoke":
        print(f"revoked {args.host_id}: its certificates are refused from now on" if done else "already revoked")
    else:
        print(f"removed {args.host_id}: its certificates are refused; its jobs are kept")
    return Exit.OK


def cmd_jobs(args: argparse.Namespace) -> int:
    data = data_dir(args)
    storage = open_storage(args, data)
    jobs = storage.jobs()
    storage.close()
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
        return Exit.OK
    cols = ("job_id", "hostname", "kind", "state", "error_id", "remediation")
    print_table([c.upper() for c in cols], [[getattr(j, c) for c in cols] for j in jobs])
    return Exit.OK


def _published(data: DataDir) -> set[tuple[str, str]]:
    """(version, OS tag) of every bundle the repository publishes."""
    from server.releases.repository import Repository

    return {(e.version, e.os_tag) for e in Repository(data).list()}


def _host_ids(text: str) -> list[str]:
    import uuid

    fix = "Give host IDs as `mobility-server machines` lists them (lower-case UUIDs), separated by commas."
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise BadArguments("--machines: give host IDs, separated by commas", fix=fix)
    for host_id in ids:
        try:
            if str(uuid.UUID(host_id)) != host_id:
                raise ValueError(host_id)
        except ValueError as e:
            raise BadArguments(f"{shown(host_id)} is not a host ID", fix=fix) from e
    return list(dict.fromkeys(ids))


def cmd_update(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from server.database.rollout_rows import Selection
    from server.releases.rollouts import Rollouts, parse_version, parse_wave

    if args.halt:
        if args.to or args.machines or args.os_tag or args.all or args.allow_downgrade:
            raise BadArguments(
                "update --halt takes no other option",
                fix="Run `mobility-server update --halt` alone: it stops the running rollout, whatever it was for.",
            )
    else:
        if not args.to:
            raise BadArguments(
                "update: give --to VERSION (or --halt)",
                fix="Name the version to roll out, as `mobility-server repo list` shows it: "
                "`mobility-server update --to VERSION --all`.",
            )
        if sum([bool(args.machines), bool(args.os_tag), args.all]) != 1:
            raise BadArguments(
                "update: name the machines with one of --machines ID,..., --os-tag TAG or --all",
                fix="Give exactly one of --all, --os-tag TAG or --machines HOST_ID,... (host IDs from "
                "`mobility-server machines`).",
            )
        if args.os_tag is not None and args.os_tag not in BY_TAG:
            raise BadArguments(
                f"--os-tag {shown(args.os_tag)}: not an OS tag of the support matrix",
                fix="Give an OS tag as `mobility-server machines` shows it (docs/support-matrix.md lists them).",
            )
        version, wave, timeout = parse_version(args.to), parse_wave(args.wave), parse_duration(args.wave_timeout)
        selection = Selection(
            all=args.all, os_tag=args.os_tag, machines=tuple(_host_ids(args.machines)) if args.machines else ()
        )
    storage = open_storage(args, data)
    try:
        rollouts = Rollouts(storage)
        now = time.time()
        if args.halt:
            rollout, members = rollouts.halt("halted by an operator (mobility-server update --halt)", now)
        else:
            published = _published(data)
            rollout, members = rollouts.start(
                version, selection, wave, args.max_failures, timeout, published, now, args.allow_downgrade
            )
    finally:
        storage.close()
    if args.json:
        print(json.dumps({**rollout.to_json(), "machines": [m.to_json() for m in members]}, indent=2))
        return Exit.OK
    _print_rollout(rollout, members)
    return Exit.OK


def cmd_updates(args: argparse.Namespace) -> int:
    from server.releases.rollouts import Rollouts

    storage = open_storage(args, data_dir(args))
    try:
        listing = Rollouts(storage).listing()
    finally:
        storage.close()
    if args.json:
        print(json.dumps([{**r.to_json(), "machines": [m.to_json() for m in ms]} for r, ms in listing], indent=2))
        return Exit.OK
    if not listing:
        print("no rollouts (start one with `mobility-server update --to VERSION --all`)")
    for i, (rollout, members) in enumerate(listing):
        if i:
            print()
        _print_rollout(rollout, members)
    return Exit.OK


def _print_rollout(rollout: Any, members: list[Any]) -> None:
    counts: dict[str, int] = {}
    for m in members:
        counts[m.state] = counts.get(m.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(
        f"rollout {rollout.rollout_id}: {rollout.state}, to {rollout.to_version} for {rollout.selection.describe()}, "
        f"wave {rollout.current_wave} of {rollout.waves} ({rollout.wave_size} per wave), "
        f"at most {rollout.max_failures} failure(s), started {timefmt.shown(rollout.created_at)}"
    )
    print(f"  machines: {summary}")
    if rollout.reason:
        print(f"  {rollout.state}: {printable(rollout.reason, 2000)}")
    cols = ["HOST_ID", "HOSTNAME", "WAVE", "FROM", "NOW", "HEALTH", "STATE", "JOB", "ERROR_ID", "DETAIL"]
    rows = [
        [
            m.host_id,
            m.hostname,
            m.wave,
            m.from_version,
            m.agent_version,
            m.health,
            m.state,
            m.job_state,
            m.error_id,
            (m.detail or "").splitlines()[0] if m.detail else None,
        ]
        for m in members
    ]
    print_table(cols, rows)


def cmd_pin(args: argparse.Namespace) -> int:
    from server.releases.rollouts import Rollouts, parse_version

    data = data_dir(args)
    host_ids = _host_ids(",".join(args.host_ids))
    version = parse_version(args.to) if args.command == "pin" and args.to else None
    storage = open_storage(args, data)
    try:
        rollouts = Rollouts(storage)
        if args.command == "unpin":
            machines = rollouts.unpin(host_ids)
        else:
            reason = printable(args.reason or "pinned by an operator", 200)
            machines = rollouts.pin(host_ids, version, reason, _published(data) if version else set(), time.time())
    finally:
        storage.close()
    rows = [{"host_id": m.host_id, "hostname": m.hostname, "agent_version": m.agent_version,
             "pinned": m.pinned_version, "target_version": m.target_version, "pin_reason": m.pin_reason}
            for m in machines]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return Exit.OK
    for r in rows:
        what = f"pinned to {r['pinned']}" if r["pinned"] else "follows rollouts"
        print(f"{r['host_id']} ({printable(str(r['hostname']), 100)}): runs {r['agent_version']}, {what}")
    return Exit.OK


def cmd_repo(args: argparse.Namespace) -> int:
    from server.database.storage import Storage
    from server.releases.repository import Repository

    data = data_dir(args)
    db = open_database(args, data)
    storage = Storage.open(db, pool_size=0) if db.postgresql else None
    try:
        return _repo(args, Repository(data, storage=storage))
    finally:
        if storage is not None:
            storage.close()


def _repo(args: argparse.Namespace, repo: Any) -> int:
    if args.action == "add":
        from server.progress import progress_for

        with progress_for(False) as progress:
            added = repo.add([Path(f) for f in args.files], progress=progress)
        for entry in added:
            print(f"added {entry.name}")
        return Exit.OK
    if args.action == "remove":
        repo.remove(args.name)
        print(f"removed {args.name}")
        return Exit.OK
    if args.action == "rescan":
        added, refused = repo.rescan()
        for entry in added:
            print(f"added {entry.name}")
        for name, reason in refused:
            # Anyone who can write DATA/repository names these files: never print a name raw.
            print(f"refused {shown(name)}: {reason}", file=sys.stderr)
        return Exit.OK if not refused else Exit.ERROR
    entries = repo.list()
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2, default=str))
    else:
        print_table(["NAME", "OS TAG", "VERSION", "SIZE"], [[e.name, e.os_tag, e.version, e.size] for e in entries])
    return Exit.OK


def cmd_push(args: argparse.Namespace) -> int:
    data = data_dir(args)  # refused before the heavier imports
    from agent.shared.address import parse_address
    from server.push.progress import progress_for
    from server.push.run import default_server_address, load_credentials, push
    from server.push.targets import parse_hosts_file, parse_target, unique_targets

    targets = [parse_target(h) for h in args.host or []]
    if args.hosts_file:
        try:
            text = read_small_file(Path(args.hosts_file), MAX_HOSTS_FILE)[1].decode()
        except (OSError, NotSmallRegularFile, UnicodeDecodeError) as e:
            raise PushTargetInvalid(f"--hosts-file {args.hosts_file}: {getattr(e, 'strerror', None) or e}") from e
        targets += parse_hosts_file(text, args.hosts_file)
    if not targets:
        raise PushTargetInvalid("no hosts: give --host HOST[:PORT] (repeatable) or --hosts-file FILE")
    server = str(parse_address(args.server)) if args.server else default_server_address(data)
    credentials = load_credentials(args.user, args.key, args.password_file)
    results = push(
        data,
        unique_targets(targets),
        credentials,
        server=server,
        accept_new_host_keys=args.accept_new_host_keys,
        parallel=args.parallel,
        timeout=args.timeout,
        progress=progress_for(args.json),
        database=open_database(args, data),
    )
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"hosts": [r.to_json() for r in results], "failed": len(failed)}, indent=2))
    else:
        for r in results:
            if r.ok:
                warning = f"; warning {r.error.id}" if r.error else ""
                print(f"{r.target}: {r.state}: {r.os_tag}, {r.host_id or 'already registered'}{warning}")
            elif r.error:
                print(f"{r.target}: failed: {r.error.diagnostics()}")
        print(f"{len(results) - len(failed)} of {len(results)} hosts succeeded")
    return Exit.ERROR if failed else Exit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mobility-server", description="Mobility configuration server.")
    parser.add_argument("--version", action="version", version=f"mobility-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--data",
            default=str(DEFAULT_DATA_DIR),
            metavar="DIR",
            help=f"the server's data directory (default {DEFAULT_DATA_DIR})",
        )
        p.add_argument(
            "--database",
            metavar="URL",
            help="postgresql://USER@HOST[:PORT]/NAME (password from PGPASSWORD, PGPASSFILE or ~/.pgpass, never the "
            "URL) or sqlite:///PATH; default: what `init --database` recorded, else DIR/mobility.db",
        )
        return p

    p = command("init", "create the CA, TLS certificate, repository keys, passphrase and database")
    p.add_argument("--name", action="append", metavar="HOST_OR_IP", help="a name or IP of the server (repeatable)")
    p.set_defaults(func=cmd_init)

    p = command("upgrade", "bring the database's schema to this version (stop every instance first)")
    p.set_defaults(func=cmd_upgrade)

    p = command("serve", "serve the HTTPS API")
    p.add_argument("--listen", default=f"0.0.0.0:{wire.DEFAULT_PORT}", metavar="HOST:PORT")
    p.add_argument(
        "--heartbeat-interval",
        type=seconds(1, MAX_HEARTBEAT_INTERVAL),
        default=30.0,
        metavar="SECONDS",
        help="the interval agents are told to heartbeat at (default 30)",
    )
    p.add_argument(
        "--new-database",
        action="store_true",
        help="start with an empty database when mobility.db is missing (every machine must enrol again)",
    )
    p.add_argument(
        "--role",
        choices=("all", "api", "process"),
        default="all",
        help="all: the API and the process server (default); process: only the process server (replication); api: "
        "only the API, telling agents the process server at --process-address",
    )
    p.add_argument(
        "--process-listen",
        metavar="HOST:PORT",
        help=f"where the process server receives replication streams (default: the --listen host, port "
        f"{DEFAULT_PROCESS_PORT}, or a free port when --listen's port is 0)",
    )
    p.add_argument(
        "--process-address",
        metavar="HOST[:PORT]",
        help="the process server as agents reach it (default: the configuration server's address and the "
        "process server's port)",
    )
    p.add_argument(
        "--store-reserve",
        default="256M",
        metavar="SIZE",
        help="free space the chunk store keeps on its filesystem; new data is refused below it (default 256M)",
    )
    p.add_argument(
        "--max-connections",
        type=count(1, MAX_CONNECTIONS),
        metavar="N",
        help="connections served at once, the API's and the replication streams' together; more are answered 503 or "
        "closed (default: the open-file limit less a margin)",
    )
    p.add_argument(
        "--stats-interval",
        type=seconds(1, 86400),
        default=60.0,
        metavar="SECONDS",
        help="how often the log gets the event loop's stall figures and the connection counts (default 60)",
    )
    p.add_argument(
        "--ui-listen",
        metavar="HOST:PORT",
        help="where the dashboard and /metrics listen, or `none` (default 127.0.0.1:9445; on loopback no login, "
        "anywhere else HTTPS and operators log in: docs/monitoring.md)",
    )
    p.add_argument(
        "--ui-refresh",
        type=seconds(1, 3600),
        default=10.0,
        metavar="SECONDS",
        help="how often the dashboard reads the fleet and its pages refresh (default 10)",
    )
    p.add_argument(
        "--ui-session",
        default="12h",
        metavar="DURATION",
        help="how long a dashboard login lasts (default 12h)",
    )
    p.set_defaults(func=cmd_serve)

    p = command("passphrase", "show or rotate the enrolment passphrase")
    p.add_argument("action", choices=("show", "rotate"))
    p.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help=f"how long the old one stays valid (default {DEFAULT_GRACE})",
    )
    p.set_defaults(func=cmd_passphrase)

    p = command("token", "create an enrolment token (safe to bake into templates)")
    p.add_argument("action", choices=("create",))
    p.add_argument("--ttl", required=True, metavar="DURATION", help="lifetime, e.g. 12h or 30d")
    p.add_argument(
        "--uses", type=count(1, MAX_TOKEN_USES), metavar="N", help="how many enrolments it allows (default unlimited)"
    )
    p.set_defaults(func=cmd_token)

    p = command("machines", "list machines, or remove or revoke one")
    p.add_argument("action", nargs="?", choices=("list", "remove", "revoke"), default="list")
    p.add_argument("host_id", nargs="?", metavar="HOST_ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_machines)

    p = command("jobs", "list jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = command("update", "roll an agent version out to machines in waves (or --halt the running rollout)")
    p.add_argument("--to", metavar="VERSION", help="the version to roll out (its bundles must be published)")
    p.add_argument("--machines", metavar="ID,...", help="these machines (host IDs, comma-separated)")
    p.add_argument("--os-tag", metavar="TAG", help="every machine of this OS tag")
    p.add_argument("--all", action="store_true", help="every machine")
    p.add_argument("--wave", default="10%", metavar="N%|N", help="machines per wave: a share or a count (default 10%%)")
    p.add_argument(
        "--max-failures",
        type=count(1, MAX_FLEET),
        default=1,
        metavar="N",
        help="halt the rollout once this many machines failed (default 1)",
    )
    p.add_argument(
        "--wave-timeout",
        default="30m",
        metavar="DURATION",
        help="a machine not verified on the new version within this counts as failed (default 30m)",
    )
    p.add_argument("--halt", action="store_true", help="halt the running rollout (no wave is offered after)")
    p.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let machines that run a newer version move back to --to (refused otherwise; `pin --to` moves one back)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_update)

    p = command("updates", "list rollouts, newest first, with the state of each machine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_updates)

    p = command("pin", "keep machines at a version (default: the one each runs), out of rollouts")
    p.add_argument("host_ids", nargs="+", metavar="HOST_ID")
    p.add_argument("--to", metavar="VERSION", help="move them to this version and keep them there")
    p.add_argument("--reason", metavar="TEXT", help="why (shown in `machines` and `updates`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pin)

    p = command("unpin", "let pinned machines follow rollouts again (after a rollback: once the cause is fixed)")
    p.add_argument("host_ids", nargs="+", metavar="HOST_ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pin)

    p = command("push", "install and register the agent on hosts over SSH/SFTP")
    p.add_argument("--host", action="append", metavar="HOST[:PORT]", help="a host to push to (repeatable)")
    p.add_argument("--hosts-file", metavar="FILE", help="hosts to push to, one HOST[:PORT] per line")
    p.add_argument("--user", default="root", help="the SSH user; must be root (default root)")
    credentials = p.add_mutually_exclusive_group(required=True)
    credentials.add_argument("--key", metavar="FILE", help="the SSH private key (unencrypted)")
    credentials.add_argument("--password-file", metavar="FILE", help="a root-only (0600) file holding the password")
    p.add_argument(
        "--parallel",
        type=count(1, MAX_PUSH_PARALLEL),
        default=20,
        metavar="N",
        help="hosts pushed at the same time (default 20)",
    )
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="this server as the hosts reach it (default: the first name in its TLS certificate, port 9443)",
    )
    p.add_argument(
        "--accept-new-host-keys",
        action="store_true",
        help="record the key of a host not yet in DATA/known_hosts (trust on first use); a changed key is refused",
    )
    p.add_argument(
        "--timeout",
        type=seconds(1, 3600),
        default=15.0,
        metavar="SECONDS",
        help="to connect and log in (default 15)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON (no progress)")
    p.set_defaults(func=cmd_push)

    p = command("repo", "manage the installer repository")
    repo = p.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="ACTION")
    for action, help_text in (
        ("add", "add bundles"),
        ("list", "list bundles"),
        ("remove", "remove a bundle"),
        ("rescan", "pick up bundles dropped into DATA/repository by hand"),
    ):
        q = repo.add_parser(action, help=help_text)
        q.add_argument("--data", default=argparse.SUPPRESS, metavar="DIR")
        q.add_argument("--database", default=argparse.SUPPRESS, metavar="URL")
        if action == "add":
            q.add_argument("files", nargs="+", metavar="FILE")
        elif action == "remove":
            q.add_argument("name")
        elif action == "list":
            q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_repo)

    from server.process.cli import add_commands
    from server.ui.cli import add_commands as add_ui_commands

    add_commands(command)
    add_ui_commands(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
