"""How the upgrade watcher sees and tends the daemon: which process is this root's daemon, the exits it counts under
systemd (from the unit's timestamps) and where nothing restarts the daemon but the watcher (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import CommandFailed
from agent.host.paths import Paths
from agent.update import daemonctl
from agent.update.daemonctl import NoSupervisor, SystemdSupervisor, _is_daemon


def fake_daemon(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    """A process whose command line looks like `mobility run ARGS` (a sleeping Python)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "mobility", "run", *args], cwd=cwd)


def test_the_daemon_of_this_root_and_no_other(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    relative = fake_daemon(tmp_path, "--root", "a")  # a relative --root, resolved from the process's own directory
    host = fake_daemon(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        assert _is_daemon(relative.pid, Paths(tmp_path / "a"))
        assert not _is_daemon(relative.pid, Paths(tmp_path / "b"))  # another root's daemon
        assert not _is_daemon(relative.pid, Paths(Path("/")))
        assert _is_daemon(host.pid, Paths(Path("/")))
        assert not _is_daemon(other.pid, Paths(Path("/")))  # a PID reused by another program
    finally:
        for p in (relative, host, other):
            p.kill()
            p.wait()


def test_systemd_exits_are_counted_from_the_units_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd restarts a crashing daemon itself: each exit of a process started after the mark counts once, even
    when the watcher never saw it running; the old daemon's stop (started before the mark) does not."""
    sup = SystemdSupervisor()
    sup.mark()
    mark = sup._mark_us or 0
    shows = iter(
        [
            {"MainPID": "0", "ActiveState": "activating", "ExecMainStartTimestampMonotonic": str(mark - 10**6),
             "ExecMainExitTimestampMonotonic": str(mark + 100)},  # the previous version, stopped by the restart
            {"MainPID": "0", "ActiveState": "activating", "ExecMainStartTimestampMonotonic": str(mark + 200),
             "ExecMainExitTimestampMonotonic": str(mark + 300)},  # the new one crashed between two looks
            {"MainPID": "0", "ActiveState": "activating", "ExecMainStartTimestampMonotonic": str(mark + 200),
             "ExecMainExitTimestampMonotonic": str(mark + 300)},  # the same exit, seen again
            {"MainPID": "42", "ActiveState": "active", "ExecMainStartTimestampMonotonic": str(mark + 5 * 10**6),
             "ExecMainExitTimestampMonotonic": str(mark + 300)},  # started again, running
        ]
    )  # fmt: skip
    monkeypatch.setattr(SystemdSupervisor, "_show", staticmethod(lambda: next(shows)))
    seen = [sup.look() for _ in range(4)]
    assert [(s.running, s.exits) for s in seen] == [(False, 0), (False, 1), (False, 1), (True, 1)]
    assert seen[-1].pid == 42


def test_without_a_supervisor_the_watcher_restarts_a_dead_daemon_and_counts_each_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemonctl, "RESTART_DELAY", 0.1)
    crash = [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(1)", "mobility", "run"]
    sup = NoSupervisor(Paths(tmp_path), crash)
    sup.mark()
    sup.restart()  # no daemon ran: it is started
    exits, started = 0, time.monotonic()
    while exits < 3 and time.monotonic() - started < 20:
        exits = sup.look().exits
        time.sleep(0.05)
    assert exits == 3  # each exit counted once, each followed by a new start
    for child in sup._children:
        child.kill()
        child.wait()


def test_without_a_supervisor_the_daemon_is_asked_to_start_again_in_place(tmp_path: Path) -> None:
    """SIGUSR1: a daemon that starts again from `current` keeps its PID (whoever started it keeps its child)."""
    state = tmp_path / "var/lib/mobility"
    state.mkdir(parents=True)
    program = (
        "import json, os, signal, sys, time\n"
        f"state = {str(state / 'daemon.json')!r}\n"
        "def again(*_):\n"
        "    os.execv(sys.executable, [sys.executable, *sys.argv])\n"
        "signal.signal(signal.SIGUSR1, again)\n"
        "json.dump({'pid': os.getpid(), 'started': time.time(), 'version': '0.1.1'}, open(state, 'w'))\n"
        "time.sleep(30)\n"
    )
    (tmp_path / "daemon.py").write_text(program)
    daemon = subprocess.Popen([sys.executable, str(tmp_path / "daemon.py"), "mobility", "run", "--root", str(tmp_path)])
    try:
        deadline = time.monotonic() + 10
        while not (state / "daemon.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = json.loads((state / "daemon.json").read_text())["started"]
        sup = NoSupervisor(Paths(tmp_path), ["false"])
        sup.restart()
        again = json.loads((state / "daemon.json").read_text())
        assert again["pid"] == daemon.pid and again["started"] > first
        assert daemon.poll() is None and sup._children == []  # not killed, nothing started beside it
    finally:
        daemon.kill()
        daemon.wait()


def test_systemd_that_does_not_answer_in_time_is_unknown_not_the_watchers_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """`systemctl show` timing out (a busy PID 1) used to raise out of the watcher, which then left a crash-looping
    new version alone: now the look says "unknown" and the exits counted so far stay counted."""
    sup = SystemdSupervisor()
    sup.mark()

    def busy() -> dict[str, str]:
        raise CommandFailed("systemctl show mobility.service: timed out after 30 seconds")

    monkeypatch.setattr(SystemdSupervisor, "_show", staticmethod(busy))
    seen = sup.look()
    assert (seen.running, seen.pid, seen.exits) == (None, None, 0)


def test_without_a_supervisor_what_the_new_version_prints_is_kept_for_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version that crashes at start says why only on its stderr: the daemons the watcher starts write to
    /var/log/mobility/daemon.out (emptied at each start), which the job's detail quotes."""
    monkeypatch.setattr(daemonctl, "RESTART_DELAY", 0.1)
    words = "import sys; print('starting'); sys.exit('mobility 9.9.9: cannot load its configuration')"
    since = time.time() - 1
    sup = NoSupervisor(Paths(tmp_path), [sys.executable, "-c", words, "mobility", "run"])
    sup.mark()
    sup.restart()
    while sup.look().exits < 2:
        time.sleep(0.05)
    for child in sup._children:  # a start the last look made has ended too
        child.wait(timeout=10)
    assert sup.output(since) == ["starting", "mobility 9.9.9: cannot load its configuration"]  # the last start's
    assert (tmp_path / "var/log/mobility/daemon.out").read_text().count("starting") == 1
    assert sup.output(time.time() + 60) == []  # an earlier start's words are not this one's
    for child in sup._children:
        child.kill()
        child.wait()
