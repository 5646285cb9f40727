"""The built-in PostgreSQL recovery check: in a failed-over copy of a database server, every cluster starts, replays
its WAL (crash recovery: the point froze it mid-flight, as a power cut would), passes `pg_amcheck --all` (heap and
B-tree indexes of every database, the `amcheck` extension installed where it is missing), and where pgbench's tables
are, pgbench's own invariant holds: every committed transaction added the same delta to one account, one teller, one
branch and the history, so the four sums are equal (the history's aside once pgbench emptied it for a new run).

Clusters are found as Debian and Ubuntu manage them (postgresql-common: `pg_lsclusters`, started with
`pg_ctlcluster`, which goes through systemd where it runs); each runs as its owner, over its Unix socket. A machine
without PostgreSQL skips the check; one whose PostgreSQL is laid out otherwise fails it with a message saying so
(an executable named `postgresql` in /etc/mobility/recovery.d/ replaces this check there: docs/recovery-checks.md).
Parsing is pure; the commands run through agent.host.proc."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.errors import CommandFailed
from agent.host.paths import Paths
from agent.host.proc import Completed, run
from agent.recovery.runner import CheckResult, Outcome, summary_of, tail

NAME = "postgresql"
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
LOG_TAIL = 256 * 1024
_CONF_SOCKETS = re.compile(r"^\s*unix_socket_directories\s*=?\s*'([^']*)'", re.MULTILINE)
_REDO = re.compile(r"redo (starts|done) at [0-9A-F]+/[0-9A-F]+|redo is not required", re.IGNORECASE)
_START = re.compile(r"starting PostgreSQL")
_INTERRUPTED = re.compile(r"not properly shut down|was interrupted|automatic recovery in progress")


@dataclass(frozen=True)
class Cluster:
    """A PostgreSQL cluster: how to reach it (its socket directory and port, as its owner) and how to start it."""

    label: str  # "15/main"
    port: int
    owner: str
    data: str
    bindir: Path
    socket_dir: str
    start: tuple[str, ...]  # the command that starts it
    log_file: str | None = None
    online: bool = False


def parse_lsclusters(text: str) -> list[tuple[str, str, int, str, str, str, str | None]]:
    """`pg_lsclusters --no-header` lines: (version, name, port, status, owner, data directory, log file) (pure)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[2].isdigit():
            continue
        log_file = fields[6] if len(fields) > 6 and fields[6].startswith("/") else None
        found.append((fields[0], fields[1], int(fields[2]), fields[3], fields[4], fields[5], log_file))
    return found


def socket_dir(conf: str) -> str:
    """The first Unix socket directory a postgresql.conf names (its last setting wins), or Debian's default (pure)."""
    settings: list[str] = _CONF_SOCKETS.findall(conf)
    if settings:
        first = settings[-1].split(",")[0].strip()
        if first.startswith("/"):
            return first
    return DEFAULT_SOCKET_DIR


def replay_summary(log_text: str) -> str:
    """What the cluster's log says about its last start: whether it replayed WAL (pure)."""
    starts = [m.end() for m in _START.finditer(log_text)]
    since = log_text[starts[-1] :] if starts else log_text
    redo = [m.group(0) for m in _REDO.finditer(since)]
    if not redo and not _INTERRUPTED.search(since):
        return "its log says nothing about recovery"
    if any("not required" in r for r in redo):
        return "no WAL to replay"
    return "WAL replayed (" + ", ".join(redo) + ")" if redo else "crash recovery in its log"


def invariant(sums: Sequence[int]) -> tuple[bool, str]:
    """pgbench's balance invariant over the (accounts, branches, tellers, history deltas) sums (pure): whether it
    holds, and what to say. Each transaction of pgbench's default script adds one delta to an account, a teller, a
    branch and the history, so the four sums are equal. But pgbench empties its history at the start of every run
    (unless run with -n): after a second run only the three balances are equal, which every transaction still keeps
    (a bench run twice must not fail every later check). Its simple-update script (-N) leaves tellers and branches
    alone: the accounts then equal the history, the others stay 0."""
    accounts, branches, tellers, history = sums
    if accounts == branches == tellers == history:
        return True, f"each balance sums to {accounts}"
    if accounts == branches == tellers:
        return True, (
            f"accounts, branches and tellers each sum to {accounts}; the history's deltas to {history}: pgbench "
            "empties its history when a run starts (unless run with -n)"
        )
    if accounts == history and branches == tellers == 0:
        return True, f"accounts and the history's deltas each sum to {accounts} (pgbench -N: no teller, no branch)"
    names = ("accounts", "branches", "tellers", "history deltas")
    return False, "balances differ: " + ", ".join(f"{n} {s}" for n, s in zip(names, sums, strict=True))


class Failed(Exception):
    """A step of the check failed; the message says which and why."""


class PostgresqlCheck:
    name = NAME

    def run(self, paths: Paths, timeout: float) -> CheckResult:
        start = time.monotonic()
        deadline = start + timeout
        clusters, why_not = find_clusters(paths)
        if why_not is not None:
            return CheckResult(NAME, "built-in", Outcome.SKIPPED if not clusters else Outcome.FAILED, why_not, 0.0)
        lines: list[str] = []
        failed = []
        for cluster in clusters:
            try:
                lines += [f"{cluster.label}: {line}" for line in check_cluster(cluster, deadline)]
            except Failed as e:
                failed.append(cluster.label)
                lines.append(f"{cluster.label}: FAILED: {e}")
        seconds = time.monotonic() - start
        output = "\n".join(lines)
        if failed:
            return CheckResult(NAME, "built-in", Outcome.FAILED, summary_of(output, "failed"), seconds, output)
        labels = ", ".join(c.label for c in clusters)
        return CheckResult(NAME, "built-in", Outcome.PASSED, f"{labels}: recovered and consistent", seconds, output)


def find_clusters(paths: Paths) -> tuple[list[Cluster], str | None]:
    """This machine's clusters, or why there are none to check (nothing installed: skipped; installed in a way this
    check does not know, or on another root: failed, with the clusters list empty and the reason)."""
    installed = sorted(paths.resolve("/usr/lib/postgresql").glob("*/bin/postgres")) + [
        p for p in (paths.resolve("/usr/bin/postgres"), paths.resolve("/usr/sbin/postgres")) if p.exists()
    ]
    installed += sorted(paths.resolve("/usr").glob("pgsql-*/bin/postgres"))
    lsclusters = paths.resolve("/usr/bin/pg_lsclusters")
    if not installed:
        return [], "no PostgreSQL on this machine"
    unknown = (
        "PostgreSQL is installed but not as postgresql-common manages it (pg_lsclusters): this check knows Debian's "
        "and Ubuntu's clusters; put a check of your own named postgresql in /etc/mobility/recovery.d/"
    )
    if not lsclusters.exists():
        return [Cluster("?", 0, "", "", Path(), "", ())], unknown
    if paths.root != paths.root.parent:
        return [Cluster("?", 0, "", "", Path(), "", ())], f"PostgreSQL under --root {paths.root} cannot be started here"
    listed = parse_lsclusters(run(["pg_lsclusters", "--no-header"], timeout=60).stdout)
    if not listed:
        return [], "PostgreSQL is installed but has no cluster"
    clusters = []
    for version, name, port, status, owner, data, log_file in listed:
        conf = _read(Path("/etc/postgresql") / version / name / "postgresql.conf")
        clusters.append(
            Cluster(
                f"{version}/{name}",
                port,
                owner,
                data,
                Path("/usr/lib/postgresql") / version / "bin",
                socket_dir(conf),
                ("pg_ctlcluster", version, name, "start"),
                log_file,
                status.startswith("online"),
            )
        )
    return clusters, None


def _read(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def check_cluster(cluster: Cluster, deadline: float) -> list[str]:
    """Start ``cluster`` (when down), wait for its recovery, run pg_amcheck and the pgbench invariant: what was
    found, one line each; Failed on the first step that fails."""
    lines = []
    t = time.monotonic()
    if not cluster.online:
        try:
            run(list(cluster.start), timeout=max(1.0, deadline - time.monotonic()))
        except CommandFailed as e:
            # pg_ctl gives up waiting after a minute while a long recovery goes on: the wait below decides.
            lines.append(f"start: {e.message}")
    in_recovery = _wait_ready(cluster, deadline)
    waited = time.monotonic() - t
    replay = replay_summary(_read(Path(cluster.log_file))) if cluster.log_file else "no log file known"
    role = "a standby, still in recovery: checked read-only" if in_recovery else "accepting writes"
    lines.append(f"ready after {waited:.1f} s, {role}; {replay}")

    t = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            done = _as_owner(
                cluster,
                [str(cluster.bindir / "pg_amcheck"), "--all", "--install-missing", *_where(cluster)],
                deadline,
                output=out,
            )
        except CommandFailed as e:
            raise Failed(f"pg_amcheck: {e.message}") from e
        out.seek(0, 2)
        out.seek(max(0, out.tell() - 4096))
        said = tail(out.read(), 4096)
    if done.returncode != 0:
        raise Failed(f"pg_amcheck --all exited {done.returncode}: {summary_of(said, 'no output')}\n{said}")
    lines.append(f"pg_amcheck --all: no corruption ({time.monotonic() - t:.1f} s)")

    checked = 0
    for database in _sql(cluster, "postgres", _DATABASES, deadline).splitlines():
        schema = _sql(cluster, database, _PGBENCH_SCHEMA, deadline).strip()
        if not schema:
            continue
        row = _sql(cluster, database, _sums(schema), deadline).strip()
        sums = [int(x) for x in row.split("|")]
        holds, said = invariant(sums)
        if not holds:
            raise Failed(f"pgbench invariant in database {database}: {said}")
        checked += 1
        lines.append(f"pgbench invariant holds in database {database} ({said})")
    if not checked:
        lines.append("no pgbench tables: no invariant to check")
    return lines


_DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
# The schema holding all four of pgbench's tables, if one does.
_PGBENCH_SCHEMA = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') "
    "AND c.relname IN ('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'pgbench_history') "
    "GROUP BY n.nspname HAVING count(*) = 4 ORDER BY n.nspname LIMIT 1"
)


def _sums(schema: str) -> str:
    # The schema's name comes from the catalogue; quoted as an identifier (quotes doubled), it is only a name.
    q = '"' + schema.replace('"', '""') + '"'
    columns = (("pgbench_accounts", "abalance"), ("pgbench_branches", "bbalance"), ("pgbench_tellers", "tbalance"))
    parts = [f"(SELECT coalesce(sum({col}), 0) FROM {q}.{table})" for table, col in columns]  # noqa: S608
    parts.append(f"(SELECT coalesce(sum(delta), 0) FROM {q}.pgbench_history)")  # noqa: S608
    # One snapshot for the four sums: REPEATABLE READ, read only.
    return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT " + ", ".join(parts) + "; COMMIT"


def _where(cluster: Cluster) -> list[str]:
    return ["-h", cluster.socket_dir, "-p", str(cluster.port)]


def _as_owner(cluster: Cluster, argv: list[str], deadline: float, output: IO[bytes] | None = None) -> Completed:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Failed("out of time")
    return run(["runuser", "-u", cluster.owner, "--", *argv], timeout=left, check=False, output=output)


def _psql(cluster: Cluster) -> list[str]:
    return [str(cluster.bindir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", *_where(cluster)]


def _sql(cluster: Cluster, database: str, sql: str, deadline: float) -> str:
    try:
        done = _as_owner(cluster, [*_psql(cluster), "-d", database, "-c", sql], deadline)
    except CommandFailed as e:
        raise Failed(f"psql in {database}: {e.message}") from e
    if done.returncode != 0:
        raise Failed(f"psql in {database}: {done.stderr.strip()[-500:]}")
    return done.stdout


def _wait_ready(cluster: Cluster, deadline: float) -> bool:
    """Wait until the cluster takes connections (crash recovery replays its WAL before it does); whether it is
    still in recovery then (a standby)."""
    last = ""
    while True:
        try:
            done = _as_owner(cluster, [*_psql(cluster), "-d", "postgres", "-c", "SELECT pg_is_in_recovery()"], deadline)
            if done.returncode == 0 and done.stdout.strip() in ("t", "f"):
                return done.stdout.strip() == "t"
            last = done.stderr.strip()[-300:]
        except CommandFailed as e:
            last = e.message
        if time.monotonic() + 1.0 >= deadline:
            raise Failed(f"did not take connections in time: {last}")
        time.sleep(1.0)
