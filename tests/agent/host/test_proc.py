"""The environment of the host programs the agent runs (agent/host/proc.py): the one the agent was started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import CommandFailed
from agent.host.proc import host_environ, run

FROZEN = {
    "PATH": "/usr/bin:/bin",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "LD_LIBRARY_PATH": "/usr/local/mobility/versions/0.1.0/mobility/_internal",
    "_PYI_ARCHIVE_FILE": "/usr/local/mobility/versions/0.1.0/mobility/_internal/mobility",
    "_PYI_APPLICATION_HOME_DIR": "/usr/local/mobility/versions/0.1.0/mobility/_internal",
    "_PYI_PARENT_PROCESS_LEVEL": "1",
    "_PYI_LINUX_PROCESS_NAME": "ld-linux-x86-64",
}


def test_a_frozen_agent_gives_its_children_no_loader_variable_of_its_own() -> None:
    env = host_environ(FROZEN, frozen=True)
    assert env == {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/run/systemd/notify"}


def test_the_hosts_own_library_path_is_given_back() -> None:
    env = host_environ(
        {
            **FROZEN,
            "LD_LIBRARY_PATH": f"{FROZEN['LD_LIBRARY_PATH']}:/opt/vendor/lib",
            "LD_LIBRARY_PATH_ORIG": "/opt/vendor/lib",
        },
        frozen=True,
    )
    assert env["LD_LIBRARY_PATH"] == "/opt/vendor/lib" and "LD_LIBRARY_PATH_ORIG" not in env
    # LD_PRELOAD is the host's (the agent never sets it): it stays.
    assert host_environ({**FROZEN, "LD_PRELOAD": "/lib/libx.so"}, frozen=True)["LD_PRELOAD"] == "/lib/libx.so"


def test_outside_a_frozen_program_nothing_changes() -> None:
    assert host_environ(FROZEN, frozen=False) == FROZEN


def test_run_passes_the_host_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_LIBRARY_PATH", "/nonexistent/_internal")
    monkeypatch.setenv("_PYI_ARCHIVE_FILE", "/nonexistent/mobility")
    monkeypatch.setattr("sys.frozen", True, raising=False)
    out = run(["/usr/bin/env"]).stdout
    assert "LD_LIBRARY_PATH" not in out and "_PYI_" not in out and "PATH=" in out
    with pytest.raises(CommandFailed, match="exited 3"):
        run(["/bin/sh", "-c", "exit 3"])


def test_no_other_module_starts_a_process() -> None:
    """proc.run() is the one way the agent starts a program (so every child gets the host's environment); the daemon's
    own restart is one exec, and it goes through the bundled loader (runtime.self_command); the upgrade watcher's
    keeper (where no init system restarts a killed watcher) is the one fork, and it execs the watcher again in the
    host's environment."""
    import ast

    from tests.conftest import REPO

    starters = {"system", "popen", "spawnl", "spawnv", "spawnve", "spawnvp", "posix_spawn", "posix_spawnp", "fork"}
    found = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n in ("subprocess", "pty", "multiprocessing") for n in names if n):
                    found.append(f"{rel}: imports {', '.join(n for n in names if n)}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and (node.attr in starters or node.attr.startswith("exec"))
            ):
                found.append(f"{rel}: os.{node.attr}")
    assert found == [
        "agent/daemon/loop.py: os.execve",
        "agent/host/proc.py: imports subprocess",
        "agent/update/keeper.py: os.fork",
        "agent/update/keeper.py: os.execve",
    ]


def test_a_cancelled_command_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """A freeze hook that waits (here a shell and its sleep) is killed at once when the point is cancelled, and so
    is the child holding its output open: the stop is not held up by it."""
    import threading
    import time

    pidfile = tmp_path / "sleep.pid"
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(CommandFailed, match="cancelled"):
        run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=60, cancel=cancel)
    assert time.monotonic() - started < 3
    pid = int(pidfile.read_text())
    time.sleep(0.1)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or not reaped yet
    assert run(["sh", "-c", "echo ok"], cancel=threading.Event()).stdout == "ok\n"
    with pytest.raises(CommandFailed, match="timed out"):
        run(["sleep", "5"], timeout=0.2, cancel=threading.Event())
