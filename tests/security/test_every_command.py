"""Every agent command, and every option of one that takes a path or a file, has its hostile cases here: a new
command or a new path option fails `test_the_cases_cover_every_command_and_path_option` until it gets them.

Each command runs against a root image whose agent directories are absolute links to a "host" directory beside
it; whatever it does or refuses, the host is untouched and no traceback is printed."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import build_parser
from tests.conftest import REPO
from tests.integration.serverproc import secret_file
from tests.security.sandbox import mobility, snapshot, unpacked_bundle
from tests.security.test_root_escapes import hostile_root, inside

HERE = Path(__file__).parent

# The arguments each command runs with (besides --root); "{bundle}" and "{out}" are filled in per test.
COMMANDS: dict[str, list[str]] = {
    "detect-os": [],
    "prereq": ["-d", "/srv/mobility"],
    "configure": ["-i", "127.0.0.1:1", "-P", "/etc/mobility/passphrase"],
    "install": ["--bundle", "{bundle}", "-r", "MS", "-v", "VmWare", "-q"],
    "run": [],
    "status": [],
    "health": [],
    "diagnostics": ["-o", "{out}"],
    "bootstrap": ["-i", "127.0.0.1:1", "-P", "/etc/mobility/passphrase", "--retry-for", "0"],
    "template-prep": [],
    "upgrade": [],
    "freeze-provider": ["install"],
    "uninstall": ["-Y"],
    "point": ["--timeout", "5"],  # no daemon under the root: DAEMON-NOT-RUNNING, nothing written
    "thaw": [],  # the freeze record is read inside the root; nothing is frozen there, nothing written
    "recovery-check": ["--here", "--timeout", "5"],  # recovery.d and the clusters are looked for inside the root
}

# Options that take a path or a file -> the tests (file::function) that try hostile values of it.
PATH_OPTIONS: dict[tuple[str, str], list[str]] = {
    **{(command, "--root"): ["test_every_command.py::test_a_command_under_a_root_of_links"] for command in COMMANDS},
    ("prereq", "-d"): ["test_install_dir.py::test_relative_install_dir_is_a_usage_error_everywhere"],
    ("bootstrap", "-d"): ["test_install_dir.py::test_relative_install_dir_is_a_usage_error_everywhere"],
    ("install", "-d"): [
        "test_install_dir.py::test_system_directories_are_refused_and_nothing_is_written",
        "test_install_dir.py::test_unusable_install_dirs_are_refused",
        "test_install_dir.py::test_a_directory_that_is_not_empty_and_not_ours_is_refused",
        "test_root_escapes.py::test_dot_dot_in_the_install_dir_never_leaves_the_root",
    ],
    ("install", "--bundle"): [
        "test_bundle_dir.py::test_a_file_not_listed_is_not_installed",
        "test_bundle_dir.py::test_a_listed_file_that_links_out_of_the_bundle_is_refused",
        "test_bundle_dir.py::test_a_listed_name_that_is_not_a_regular_file_is_refused_without_reading_it",
        "test_bundle_dir.py::test_a_file_swapped_after_the_first_look_cannot_get_in",
        "test_bundle_dir.py::test_a_bundle_dir_that_is_not_one_is_refused",
    ],
    ("bootstrap", "--bundle"): ["test_root_escapes.py::test_push_style_bootstrap_installs_only_what_bundle_json_lists"],
    ("configure", "-P"): ["test_secret_files.py::test_configure_refuses_a_bad_passphrase_file_at_once"],
    ("bootstrap", "-P"): ["test_secret_files.py::test_bootstrap_refuses_a_bad_passphrase_file_in_the_root"],
    ("diagnostics", "-o"): [
        "test_output_and_config_files.py::test_diagnostics_output_replaces_a_planted_link_never_writes_through_it",
        "test_output_and_config_files.py::test_diagnostics_output_that_cannot_be_written_is_a_clear_error",
    ],
}
_PATH_METAVARS = {"DIR", "FILE"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_cases_cover_every_command_and_path_option() -> None:
    commands = _commands()
    assert set(COMMANDS) == set(commands), "give each agent command its hostile-root case in COMMANDS"
    found = {
        (name, action.option_strings[0])
        for name, parser in commands.items()
        for action in parser._actions
        if action.option_strings and action.metavar in _PATH_METAVARS
    }
    assert found == set(PATH_OPTIONS), "give each option that takes a path or a file its cases in PATH_OPTIONS"
    for tests in PATH_OPTIONS.values():
        for test in tests:
            file, function = test.split("::")
            assert f"def {function}(" in (HERE / file).read_text(), test


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_under_a_root_of_links(command: str, tmp_path: Path) -> None:
    root, host = hostile_root(tmp_path)
    conf = inside(root, host, "etc/mobility")
    conf.mkdir(parents=True)
    secret_file(conf / "passphrase", "not-a-real-passphrase")
    secret_file(host / "etc/mobility/passphrase", "the-host-s-own")  # what following the link on the host finds
    (tmp_path / "out").mkdir()
    args = [
        a.format(bundle=unpacked_bundle(tmp_path / "bundle"), out=tmp_path / "out/diag.tar.gz") if "{" in a else a
        for a in COMMANDS[command]
    ]
    before = snapshot(host)
    if command == "run":
        _run_the_daemon_briefly(root)
    else:
        r = mobility(command, "--root", str(root), *args)
        assert "Traceback" not in r.stderr, r.stderr
    assert snapshot(host) == before


def _run_the_daemon_briefly(root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--root", str(root)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in err, err
