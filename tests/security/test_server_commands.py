"""Every `mobility-server` option that takes a path or a file, with the files an attacker or a careless operator
gives it: a FIFO (nothing must hang), /dev/zero (nothing must read for ever), a directory, a huge file. A new
command or path option fails `test_the_cases_cover_every_server_path_option` until it gets its cases here.

The agent's own commands are in test_every_command.py; bootstrap.conf is here because templates carry it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser
from tests.conftest import DISTROS, REPO
from tests.integration.serverproc import init_server, server_cli

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent

# (command, option) -> the tests here (or in the named file) that give it hostile values.
PATH_OPTIONS: dict[tuple[str, str], list[str]] = {
    **{
        (command, "--data"): ["test_server_commands.py::test_data_directories_that_are_not_one"]
        for command in (
            "init",
            "upgrade",
            "serve",
            "passphrase",
            "token",
            "machines",
            "jobs",
            "push",
            "repo",
            "update",
            "updates",
            "pin",
            "unpin",
            "protect",
            "unprotect",
            "protection",
            "policy",
            "points",
            "failover",
            "test-failover",
            "verify",
            "store",
            "operator",
            "audit",
        )
    },
    ("operator", "--cert-out"): ["test_server_commands.py::test_operator_certificates_go_only_into_a_directory"],
    ("push", "--key"): ["test_server_commands.py::test_push_credentials_and_hosts_files_that_are_not_files"],
    ("push", "--password-file"): ["test_server_commands.py::test_push_credentials_and_hosts_files_that_are_not_files"],
    ("push", "--hosts-file"): ["test_server_commands.py::test_push_credentials_and_hosts_files_that_are_not_files"],
    ("failover", "--out"): ["test_replication.py::test_failover_outputs_and_scratch_areas_that_are_not_directories"],
    ("failover", "--scratch"): [
        "test_replication.py::test_failover_outputs_and_scratch_areas_that_are_not_directories"
    ],
    ("test-failover", "--scratch"): [
        "test_replication.py::test_failover_outputs_and_scratch_areas_that_are_not_directories"
    ],
    ("repo add", "files"): [
        "test_server_commands.py::test_repo_add_of_files_that_are_not_bundles",
        "test_bundle_archives.py::test_repo_add_refuses_within_bounds",
    ],
}
_PATH_METAVARS = {"DIR", "FILE"}


def _options(
    parser: argparse.ArgumentParser, prefix: str = "", metavars: set[str] = _PATH_METAVARS
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _options(sub, f"{prefix} {name}".strip(), metavars)
        elif action.metavar in metavars and prefix:
            found.add(
                (
                    prefix.split(maxsplit=1)[0] if action.option_strings else prefix,
                    action.option_strings[0] if action.option_strings else action.dest,
                )
            )
    return found


def test_the_cases_cover_every_server_path_option() -> None:
    assert _options(build_parser()) == set(PATH_OPTIONS), "give each path option its cases in PATH_OPTIONS"
    for tests in PATH_OPTIONS.values():
        for test in tests:
            file, function = test.split("::")
            assert f"def {function}(" in (HERE / file).read_text(), test


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("srv") / "data"
    init_server(d)
    return d


def hostile_files(where: Path) -> dict[str, Path]:
    """A FIFO, /dev/zero, a directory, a 10 MiB file and a file that is not there."""
    where.mkdir(parents=True, exist_ok=True)
    fifo = where / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo, 0o600)
    big = where / "big"
    with big.open("wb") as f:
        f.truncate(10 << 20)
    big.chmod(0o600)
    (where / "dir").mkdir(exist_ok=True)
    return {"fifo": fifo, "zero": Path("/dev/zero"), "dir": where / "dir", "big": big, "missing": where / "nope"}


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command with a deadline and a memory limit: a regression hangs or balloons into a failure, not a stall."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource,sys,runpy; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "sys.argv = ['mobility-server', *sys.argv[1:]]; runpy.run_module('server', run_name='__main__')",
            *args,
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )


def test_push_credentials_and_hosts_files_that_are_not_files(data: Path, tmp_path: Path) -> None:
    bad = hostile_files(tmp_path)
    key = tmp_path / "key"
    for name, path in bad.items():
        for option in ("--key", "--password-file"):
            r = cli(data, "push", "--host", "192.0.2.1", option, str(path))
            assert (r.returncode, r.stderr.split(":")[0]) == (2, "error PUSH-CREDENTIALS-INVALID"), (
                option,
                name,
                r.stderr,
            )
            assert "Traceback" not in r.stderr
        key.write_text("not a key\n")
        key.chmod(0o600)
        r = cli(data, "push", "--hosts-file", str(path), "--key", str(key))
        assert r.stderr.split(":")[0] in ("error PUSH-TARGET-INVALID", "error PUSH-CREDENTIALS-INVALID"), (
            name,
            r.stderr,
        )
        assert "Traceback" not in r.stderr and r.returncode == 2


def test_repo_add_of_files_that_are_not_bundles(data: Path, tmp_path: Path) -> None:
    bad = hostile_files(tmp_path)
    for name, path in bad.items():
        r = cli(data, "repo", "add", str(path))
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error BUNDLE-REFUSED"), (name, r.stderr)
        assert len(r.stderr) < 2048
    assert json.loads(server_cli(data, "repo", "list", "--json", check=True).stdout) == []
    assert not [p for p in (data / "repository").iterdir() if p.name.startswith(".")]  # no copy left behind


def test_operator_certificates_go_only_into_a_directory(data: Path, tmp_path: Path) -> None:
    """--cert-out: a FIFO, /dev/zero, a file or a missing path is refused before anything is made; a directory
    holding a file (or a link) of a name about to be written is refused without touching it."""
    bad = hostile_files(tmp_path / "hostile")
    for name, path in bad.items():
        if name == "dir":
            continue
        r = cli(data, "operator", "add", "eve", "--cert-out", str(path))
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error USAGE"), (name, r.stderr)
        assert "Traceback" not in r.stderr
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "eve.p12").symlink_to(tmp_path / "elsewhere")
    r = cli(data, "operator", "add", "eve", "--cert-out", str(planted))
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error USAGE"), r.stderr
    assert not (tmp_path / "elsewhere").exists() and sorted(p.name for p in planted.iterdir()) == ["eve.p12"]
    assert "eve" not in server_cli(data, "operator", "list", check=True).stdout
    r = cli(data, "operator", "add", "eve", "--cert-out", str(bad["dir"]))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in bad["dir"].iterdir()) == ["eve.crt", "eve.key", "eve.p12"]
    server_cli(data, "operator", "remove", "eve", check=True)


def test_data_directories_that_are_not_one(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command in (
        ("serve", "--listen", "127.0.0.1:0"),
        ("upgrade",),
        ("machines",),
        ("jobs",),
        ("passphrase", "show"),
        ("token", "create", "--ttl", "1h"),
        ("repo", "list"),
        ("push", "--host", "h", "--key", "k"),
        ("update", "--to", "0.1.1", "--all"),
        ("updates",),
        ("pin", "11111111-1111-4111-8111-111111111111"),
        ("unpin", "11111111-1111-4111-8111-111111111111"),
        ("protect", "--machine", "m", "--all-disks"),
        ("unprotect", "--machine", "m"),
        ("protection",),
        ("policy", "list"),
        ("points", "--machine", "m"),
        ("failover", "--machine", "m", "--point", "latest", "--out", str(tmp_path / "out")),
        ("test-failover", "--machine", "m", "--point", "latest"),
        ("verify", "--point", "p"),
        ("store", "repair"),
        ("operator", "list"),
        ("audit",),
    ):
        for where in (tmp_path / "missing", afile, Path("/dev/null")):
            r = server_cli(where, *command)
            assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DATA-DIR-NOT-INITIALISED"), (command, where)
    for where in (afile, Path("/dev/null")):
        r = server_cli(where, "init")
        assert r.returncode != 0 and r.stderr.startswith("error ") and "Traceback" not in r.stderr, r.stderr
    assert afile.read_text() == "x"


def test_bootstrap_conf_that_is_not_a_small_text_file(tmp_path: Path) -> None:
    import shutil

    for kind in ("fifo", "zero", "big", "binary"):
        root = tmp_path / kind
        shutil.copytree(DISTROS / "debian12", root, symlinks=True)
        conf = root / "etc" / "mobility" / "bootstrap.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(conf)
        elif kind == "zero":
            conf.symlink_to("/dev/zero")
        elif kind == "big":
            conf.write_text("# comment\n" * 100_000)
        else:
            conf.write_bytes(b"server = \xff\xfe\n")
        r = subprocess.run(
            [sys.executable, "-m", "agent", "bootstrap", "--root", str(root)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error BOOTSTRAP-CONF-INVALID"), (kind, r.stderr)


def test_databases_that_are_not_one(data: Path, tmp_path: Path) -> None:
    """--database given a FIFO, /dev/zero, a directory or garbage, and a database.url in the data directory that is
    not a small text file: a clear error at once, nothing hangs, nothing is written."""
    files = hostile_files(tmp_path / "h")
    for name in ("fifo", "zero", "dir"):
        r = server_cli(data, "machines", "--database", f"sqlite:///{files[name]}")
        assert (r.returncode, r.stderr.split(":")[0]) == (1, "error DB-CORRUPT"), (name, r.stderr)
    for url in ("postgresql://u:secret@127.0.0.1/db", "mysql://x@y/z", "postgresql://u@h"):
        r = server_cli(data, "jobs", "--database", url)
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DB-URL-INVALID"), (url, r.stderr)
        assert "secret" not in r.stderr
    recorded = data / "database.url"
    original = recorded.read_bytes() if recorded.exists() else None  # a PostgreSQL run records its URL here
    try:
        for name in ("fifo", "zero", "big", "dir"):
            recorded.unlink(missing_ok=True)
            recorded.symlink_to(files[name])
            r = server_cli(data, "machines")
            assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DB-URL-INVALID"), (name, r.stderr)
    finally:
        recorded.unlink(missing_ok=True)
        if original is not None:
            recorded.write_bytes(original)
    assert server_cli(data, "machines").returncode == 0


SECRET = "hunter2-Zq8"


def test_database_urls_never_show_a_password(data: Path, tmp_path: Path) -> None:
    """A password given in a database URL (as userinfo, as ?password=, or in a libpq key=value string), and URLs that
    do not parse: DB-URL-INVALID with no traceback, the password in no output, no file and no data directory; and a
    libpq string is never taken for the path of a SQLite file (which would be named after the password)."""
    cases = (
        f"postgresql://mobility:{SECRET}@127.0.0.1/fleet",
        f"postgresql://mobility@127.0.0.1/fleet?password={SECRET}",
        f"postgresql://mobility@127.0.0.1/fleet?sslpassword={SECRET}",
        f"postgresql://mobility:{SECRET}@127.0.0.1:notaport/fleet",
        f"postgresql://mobility:{SECRET}@[::1/fleet",
        f"postgresql://mobility@127.0.0.1:99999/fleet?password={SECRET}",
        f"mysql://mobility:{SECRET}@127.0.0.1/fleet",
        f"sqlite:///{tmp_path}/x.db?password={SECRET}",
        f"host=127.0.0.1 dbname=fleet user=mobility password={SECRET}",
        f"dbname=fleet password = '{SECRET}'",
        f"{tmp_path}/x.db?password={SECRET}",
    )
    for url in cases:
        for command in (("jobs",), ("machines", "--json")):
            r = server_cli(data, *command, "--database", url)
            assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DB-URL-INVALID"), (url, r.stderr)
            assert SECRET not in r.stdout + r.stderr and "Traceback" not in r.stderr, (url, r.stderr)
        fresh = tmp_path / "fresh"
        r = subprocess.run(
            [sys.executable, "-m", "server", "init", "--data", str(fresh), "--database", url],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # where a plain path would be made relative to
            timeout=60,
            check=False,
        )
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DB-URL-INVALID"), (url, r.stderr)
        assert SECRET not in r.stdout + r.stderr and not fresh.exists(), (url, r.stderr)
        made = [p for p in tmp_path.rglob("*") if SECRET in p.name]
        assert not made, made
    # A database.url that carries one (an older server wrote it, or a hand edit): refused, not shown.
    recorded = data / "database.url"
    original = recorded.read_bytes() if recorded.exists() else None
    try:
        for url in cases:
            recorded.write_text(url + "\n")
            r = server_cli(data, "machines")
            assert (r.returncode, r.stderr.split(":")[0]) == (2, "error DB-URL-INVALID"), (url, r.stderr)
            assert SECRET not in r.stdout + r.stderr, r.stderr
    finally:
        recorded.unlink()
        if original is not None:
            recorded.write_bytes(original)
    assert server_cli(data, "machines").returncode == 0


HOST = "11111111-1111-4111-8111-111111111111"
_FAILOVER = ("failover", "--machine", HOST, "--point", "latest", "--out", "/nonexistent/out")
_TEST_FAILOVER = ("test-failover", "--machine", HOST, "--point", "latest", "--boot")
TOO_MANY_DIGITS = "9" * 5000  # past Python's int() limit for text: a ValueError, not a number
# Every numeric option of mobility-server (its metavar says so) -> (the command line it is given in, values past its
# bounds, the error ID). A new numeric option fails `test_the_cases_cover_every_numeric_option` until it is here.
NUMBER_OPTIONS: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...], str]] = {
    ("serve", "--listen"): (("serve",), ("127.0.0.1:99999999999999999999", "127.0.0.1:65536", "[::1]:²"), "USAGE"),
    ("serve", "--heartbeat-interval"): (("serve",), ("nan", "inf", "1e400", "0", "-30", "86401"), "USAGE"),
    ("serve", "--process-listen"): (("serve",), ("127.0.0.1:99999999999999999999", "127.0.0.1:²"), "USAGE"),
    ("serve", "--process-address"): (("serve",), ("h:99999999999999999999", f"h:{TOO_MANY_DIGITS}"), "USAGE"),
    ("serve", "--store-reserve"): (("serve",), ("99999999999999999999T", "2P", "-1", "1e9"), "USAGE"),
    ("serve", "--max-connections"): (("serve",), ("99999999999999999999", "0", "-1", TOO_MANY_DIGITS), "USAGE"),
    ("serve", "--stats-interval"): (("serve",), ("nan", "inf", "0", "99999999999999999999"), "USAGE"),
    ("passphrase", "--grace"): (("passphrase", "rotate"), ("99999999999999999999d", "3651d", "1e9s"), "BAD-DURATION"),
    ("token", "--ttl"): (("token", "create"), ("99999999999999999999d", f"{TOO_MANY_DIGITS}s", "0s"), "BAD-DURATION"),
    ("token", "--uses"): (("token", "create", "--ttl", "1h"), ("99999999999999999999", "0", "1e3"), "USAGE"),
    ("update", "--to"): (("update", "--all"), ("99999999999999999999.0", f"{TOO_MANY_DIGITS}.1"), "USAGE"),
    ("update", "--wave"): (("update", "--to", "0.1.1", "--all"), ("99999999999999999999", "101%", "0"), "USAGE"),
    ("update", "--max-failures"): (("update", "--to", "0.1.1", "--all"), ("99999999999999999999", "0"), "USAGE"),
    ("update", "--wave-timeout"): (("update", "--to", "0.1.1", "--all"), ("99999999999999999999m",), "BAD-DURATION"),
    ("pin", "--to"): (("pin", HOST), ("99999999999999999999.0", f"1.{TOO_MANY_DIGITS}"), "USAGE"),
    ("push", "--host"): (("push", "--key", "k"), ("h:99999999999999999999", "h:²", "h:0"), "PUSH-TARGET-INVALID"),
    ("push", "--parallel"): (("push", "--host", "h", "--key", "k"), ("99999999999999999999", "0"), "USAGE"),
    ("push", "--server"): (
        ("push", "--host", "h", "--key", "k"),
        ("h:99999999999999999999", "h:²"),
        "SERVER-ADDRESS-INVALID",
    ),
    ("push", "--timeout"): (("push", "--host", "h", "--key", "k"), ("nan", "inf", "-1", "1e400"), "USAGE"),
    ("policy", "--rpo"): (("policy", "set", "p"), ("99999999999999999999d", "8d"), "POLICY-INVALID"),
    ("policy", "--interval"): (("policy", "set", "p"), ("99999999999999999999d", "8d"), "POLICY-INVALID"),
    # 2T: a size the server can store, but no agent accepts (the wire's bound is 1 TiB/s): refused here too.
    ("policy", "--bandwidth"): (
        ("policy", "set", "p"),
        ("99999999999999999999T", "2T", "1025G", "-1"),
        "POLICY-INVALID",
    ),
    ("policy", "--retention"): (("policy", "set", "p"), ("99999999999999999999", "10001", "0"), "POLICY-INVALID"),
    ("serve", "--ui-listen"): (("serve",), ("127.0.0.1:99999999999999999999", "127.0.0.1:65536", "[::1]:²"), "USAGE"),
    ("serve", "--ui-refresh"): (("serve",), ("nan", "inf", "0", "-1", "3601", "1e400"), "USAGE"),
    ("serve", "--ui-session"): (("serve",), ("99999999999999999999h", "0s", "3651d", "1e9s"), "BAD-DURATION"),
    ("audit", "--limit"): (("audit",), ("99999999999999999999", "0", "1001", "-1", TOO_MANY_DIGITS), "USAGE"),
    ("failover", "--wait"): (_FAILOVER, ("99999999999999999999d", "0s", "2d", TOO_MANY_DIGITS), "BAD-DURATION"),
    ("test-failover", "--wait"): (_TEST_FAILOVER, ("99999999999999999999d", "0s", "2d"), "BAD-DURATION"),
    ("test-failover", "--boot-timeout"): (_TEST_FAILOVER, ("99999999999999999999d", "5s", "2d"), "BAD-DURATION"),
    ("test-failover", "--check-timeout"): (_TEST_FAILOVER, ("99999999999999999999d", "0s", "2d"), "BAD-DURATION"),
    ("test-failover", "--memory"): (_TEST_FAILOVER, ("99999999999999999999", "255", "65537", "-1", "1e3"), "USAGE"),
    ("test-failover", "--cpus"): (_TEST_FAILOVER, ("99999999999999999999", "0", "17", TOO_MANY_DIGITS), "USAGE"),
}
_NUMBER_METAVARS = {"N", "SECONDS", "SIZE", "DURATION", "N%|N", "VERSION", "HOST:PORT", "HOST[:PORT]", "MIB"}


def test_the_cases_cover_every_numeric_option() -> None:
    assert _options(build_parser(), metavars=_NUMBER_METAVARS) == set(NUMBER_OPTIONS), "add the option's cases"


def test_numbers_past_their_bounds_are_clear_errors_and_change_nothing(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every numeric option given numbers past its bounds (20 digits, 5000 digits, NaN, infinity, zero, negative,
    a policy no agent accepts): its error ID and a message naming it, no traceback, nothing stored. `serve` runs in
    a child with a deadline (a bound missed would start serving); the rest run here, one after another."""
    from server.cli import main

    passphrase = server_cli(data, "passphrase", "show", check=True).stdout
    serve_cases = []
    for (command, option), (argv, values, code) in NUMBER_OPTIONS.items():
        for value in values:
            args = [*argv, option, value]
            if command == "serve":
                serve_cases.append((args, code))
                continue
            capsys.readouterr()
            returned = main([*args, "--data", str(data)])
            err = capsys.readouterr().err
            assert (returned, err.split(":")[0]) == (2, f"error {code}"), (args, err)
            assert "Traceback" not in err and len(err) < 1000, (args, err)
    for args, code in serve_cases:
        r = cli(data, *args, "--listen", "127.0.0.1:0") if "--listen" not in args else cli(data, *args)
        assert (r.returncode, r.stderr.split(":")[0]) == (2, f"error {code}"), (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)
    # The policy at the agent's own bounds is accepted, one past them is not (above): the same limit on both sides.
    assert main(["policy", "set", "edge", "--bandwidth", "1T", "--retention", "10000", "--data", str(data)]) == 0
    from agent.shared.replication_wire import Policy

    listed = json.loads(server_cli(data, "policy", "list", "--json", check=True).stdout)
    assert [Policy.from_json(p).name for p in listed] == ["default", "edge"]
    assert server_cli(data, "passphrase", "show", check=True).stdout == passphrase
    assert json.loads(server_cli(data, "updates", "--json", check=True).stdout) == []
    server_cli(data, "policy", "set", "edge", "--bandwidth", "0", check=True)
