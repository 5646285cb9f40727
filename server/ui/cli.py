"""The dashboard's commands of `mobility-server`: `operator add|list|remove` (who may log in off loopback) and
`audit` (what was changed through the dashboard, and by whom). Operators added or removed here are written to the
audit log too, under the name of the user who ran the command."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.shared import timefmt
from agent.shared.errors import BadArguments, Exit
from agent.shared.fsutil import atomic_write
from agent.shared.textsafe import printable, shown
from server.commandline import count, data_dir, open_storage, print_table
from server.datadir import DataDir
from server.errors import OperatorExists

Command = Callable[[str, str], argparse.ArgumentParser]
MAX_AUDIT = 1000


def _user() -> str:
    try:
        return f"{pwd.getpwuid(os.geteuid()).pw_name} (command line)"
    except KeyError:
        return f"uid {os.geteuid()} (command line)"


def _cert_files(where: Path, name: str) -> dict[str, Path]:
    return {"cert": where / f"{name}.crt", "key": where / f"{name}.key", "p12": where / f"{name}.p12"}


def _check_out_dir(text: str, name: str) -> Path:
    """--cert-out: an existing directory, holding none of the files about to be written (never replaced: a key
    someone relies on is not overwritten)."""
    where = Path(text)
    if not where.is_dir():
        raise BadArguments(f"--cert-out {shown(text, 200)}: not a directory")
    for path in _cert_files(where, name).values():
        if path.exists() or path.is_symlink():
            raise BadArguments(f"--cert-out: {shown(str(path), 200)} exists; remove it or give another directory")
    return where


def _write_certificate(data: DataDir, name: str, where: Path) -> tuple[str, float, dict[str, Path]]:
    """An operator certificate of the server's CA, written as NAME.crt, NAME.key (0600) and NAME.p12 (0600, no
    password: what browsers import); its fingerprint and end."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from server.api import pki

    ca = pki.Authority.load(data.ca_cert.read_bytes(), data.ca_key.read_bytes())
    key, cert = pki.issue_operator_cert(ca, name, dt.datetime.now(dt.UTC))
    files = _cert_files(where, name)
    p12 = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca.cert], serialization.NoEncryption())
    atomic_write(files["key"], pki.key_pem(key), 0o600)
    atomic_write(files["p12"], p12, 0o600)
    atomic_write(files["cert"], pki.cert_pem(cert))
    return pki.fingerprint(cert), cert.not_valid_after_utc.timestamp(), files


def cmd_operator(args: argparse.Namespace) -> int:
    from server.database.operators import Operators, parse_name

    data = data_dir(args)
    if args.action in ("add", "remove"):
        if not args.name:
            raise BadArguments(f"`operator {args.action}` needs the operator's NAME")
        parse_name(args.name)
    elif args.name:
        raise BadArguments("`operator list` takes no NAME")
    if args.cert_out and args.action != "add":
        raise BadArguments("--cert-out goes with `operator add`")
    where = _check_out_dir(args.cert_out, args.name) if args.cert_out else None
    storage = open_storage(args, data)
    try:
        operators = Operators(storage)
        now = time.time()
        if args.action == "list":
            listing = operators.listing()
            if args.json:
                print(json.dumps([o.to_json() for o in listing], indent=2))
            else:
                _table(
                    ["NAME", "ADDED", "CERTIFICATE", "CERTIFICATE EXPIRES"],
                    [[o.name, timefmt.shown(o.created_at), o.cert_fingerprint or "-",
                      timefmt.shown(o.cert_not_after, never="-")] for o in listing],
                )  # fmt: skip
            return Exit.OK
        if args.action == "remove":
            entry = operators.audit(_user(), "command line", "remove operator", args.name, None, now)
            try:
                operators.remove(args.name)
            except BaseException as e:
                operators.finish(entry, f"{getattr(e, 'id', 'failed')}: {e}", time.time())
                raise
            operators.finish(entry, "done", time.time())
            print(f"removed operator {args.name}: its token, certificate and sessions no longer work")
            return Exit.OK
        if any(o.name == args.name for o in operators.listing()):  # before a certificate is made for nothing
            raise OperatorExists(f"an operator {args.name} exists")
        fingerprint: str | None = None
        not_after: float | None = None
        files: dict[str, Path] = {}
        if where is not None:
            fingerprint, not_after, files = _write_certificate(data, args.name, where)
        entry = operators.audit(_user(), "command line", "add operator", args.name,
                                "with a client certificate" if fingerprint else None, now)  # fmt: skip
        try:
            token = operators.add(args.name, now, cert_fingerprint=fingerprint, cert_not_after=not_after)
        except BaseException as e:
            operators.finish(entry, f"{getattr(e, 'id', 'failed')}: {e}", time.time())
            for path in files.values():
                path.unlink(missing_ok=True)
            raise
        operators.finish(entry, "done", time.time())
    finally:
        storage.close()
    print(token)
    print(
        f"operator {args.name} added; the line above is its token, shown this once (only its hash is kept): it logs "
        "in to the dashboard, or goes in `Authorization: Bearer` for /metrics",
        file=sys.stderr,
    )
    for what, path in files.items():
        print(f"{what}: {path}", file=sys.stderr)
    return Exit.OK


def cmd_audit(args: argparse.Namespace) -> int:
    from server.database.operators import Operators

    data = data_dir(args)
    storage = open_storage(args, data)
    try:
        entries = Operators(storage).audit_log(args.limit)
    finally:
        storage.close()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return Exit.OK
    _table(
        ["WHEN", "OPERATOR", "ACTION", "TARGET", "OUTCOME", "VIA"],
        [[timefmt.shown(e.at), e.operator, e.action, e.target, e.outcome or "asked for; not finished", e.via]
         for e in entries],
    )  # fmt: skip
    return Exit.OK


def _table(header: list[str], rows: list[list[Any]]) -> None:

    print_table(header, [[printable(str(v), 200) if v is not None else None for v in r] for r in rows])


def add_commands(command: Command) -> None:
    """Register the dashboard's commands on `mobility-server` (``command(name, help)`` adds --data)."""
    p = command("operator", "add, list or remove the operators who may log in to the dashboard off loopback")
    p.add_argument("action", choices=("add", "list", "remove"))
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument(
        "--cert-out",
        metavar="DIR",
        help="with add: also make an operator client certificate, written to DIR as NAME.crt, NAME.key and NAME.p12",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_operator)

    p = command("audit", "the audit log: every change made through the dashboard, newest first, and by whom")
    p.add_argument(
        "--limit", type=_limit, default=100, metavar="N", help=f"entries shown (default 100, at most {MAX_AUDIT})"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)


def _limit(text: str) -> int:

    return count(1, MAX_AUDIT)(text)
