"""What a rolled-back upgrade job's detail quotes of the new version (docs/updates.md, "What to do after a halt"):
its own output and the end of agent.log, bounded, with secrets redacted, and none of the previous version's words
(real processes writing /var/log/mobility/daemon.out, as the watcher starts them where there is no init system)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.installed import InstallRecord, save_install_record
from agent.update import daemonctl, watcher
from agent.update.daemonctl import NoSupervisor
from agent.update.state import Phase, UpgradeRecord, after_last_words, last_words
from agent.update.watcher import Updater

JOB = "6f1c8a52-41a7-4d47-9d0c-2c4f1e0a9b11"
PASSPHRASE = "correct horse battery staple 7f3a"
TOKEN = "mbt_AbCdEf012345_" + "s3cr3tT0kenValue-0123456789"
KEY = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(f"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC{n:02d}" for n in range(12))
KEY += "\n-----END PRIVATE KEY-----"


def updater(tmp_path: Path, supervisor: NoSupervisor) -> Updater:
    paths = Paths(tmp_path)
    save_install_record(paths, InstallRecord("0.1.0", "DEBIAN12", "/opt/mobility"))
    u = Updater(paths, time.sleep)
    u.supervisor = supervisor
    return u


def restarted(at: float) -> UpgradeRecord:
    return UpgradeRecord("0.1.0", "0.1.1", JOB, Phase.WATCHING, at - 5, switched_at=at - 1, restarted_at=at)


def log_line(at: float, text: str, level: str = "INFO") -> str:
    """A line as the daemon's logging writes it (local time, milliseconds)."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))},000 {level} mobility.daemon: {text}\n"


def crash(tmp_path: Path, program: str) -> NoSupervisor:
    """The new version started by the watcher (no init system), printing ``program``'s words and exiting."""
    sup = NoSupervisor(Paths(tmp_path), [sys.executable, "-c", program, "mobility", "run"])
    sup.mark()
    sup.restart()  # no daemon runs: started, its output into daemon.out
    for child in sup._children:
        child.wait(timeout=20)
    return sup


def test_a_huge_output_and_log_are_cut_to_their_budgets_keeping_their_end(tmp_path: Path) -> None:
    since = time.time() - 1
    words = "import sys\nfor n in range(2000): print(f'line {n} ' + 'x' * 400)\nsys.exit('the end of 0.1.1')"
    u = updater(tmp_path, crash(tmp_path, words))
    u.paths.agent_log.write_text("".join(log_line(since + 1, f"busy {n} " + "y" * 500) for n in range(3000)))
    evidence = u._evidence(restarted(since))
    _, printed, logged = evidence.split("\n--- ")
    printed_lines, logged_lines = printed.split("\n")[1:], logged.split("\n")[1:]
    assert len("\n".join(printed_lines)) <= watcher.OUTPUT_BUDGET and printed_lines[-1] == "the end of 0.1.1"
    assert len("\n".join(logged_lines)) <= watcher.LOG_BUDGET and "busy 2999 " in logged_lines[-1]
    assert len(logged_lines) <= watcher.LOG_LINES
    assert all(len(line) <= 240 for line in printed_lines + logged_lines)  # each cut to a screen's width
    assert len(evidence) < watcher.OUTPUT_BUDGET + watcher.LOG_BUDGET + 200  # and the headers


def test_secrets_the_new_version_prints_or_logs_never_reach_the_job(tmp_path: Path) -> None:
    """The passphrase named in bootstrap.conf (bare), an enrolment token, secret-looking fields, and a private key,
    whole or cut by the tail: redacted from what the new version printed and logged."""
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    (paths.config_dir / "passphrase").write_text(PASSPHRASE + "\n")
    paths.bootstrap_conf.write_text("server = cs.example.com:9443\npassphrase_file = /etc/mobility/passphrase\n")
    since = time.time() - 1
    said = [f"enrolling with {TOKEN}", f"the passphrase is {PASSPHRASE}!", 'config: {"password": "pw-0xdeadbeef"}']
    program = f"import sys\nprint({KEY!r})\nfor s in {said!r}: print(s)\nsys.exit('nonce=feedface99 refused')"
    u = updater(tmp_path, crash(tmp_path, program))
    # The log's tail shows a key's end without its beginning (the lines before it are the key's).
    key_tail = KEY.split("\n")[-5:]
    u.paths.agent_log.write_text(
        log_line(since + 1, "starting") + "\n".join(key_tail) + "\n" + log_line(since + 2, f"proof: {TOKEN}")
    )
    evidence = u._evidence(restarted(since))
    for secret in (PASSPHRASE, TOKEN, "pw-0xdeadbeef", "feedface99", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "PRIVATE"):
        assert secret not in evidence
    assert "[REDACTED]" in evidence and "refused" in evidence and "the passphrase is" in evidence


def test_a_cut_first_line_of_the_output_is_dropped_not_half_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output's window starts in a line: half a secret there would not be recognised, so that line goes."""
    monkeypatch.setattr(daemonctl, "OUTPUT_BYTES", 64)
    program = f"print('the passphrase is {PASSPHRASE}'); print('x' * 40); print('done')"
    sup = crash(tmp_path, program)
    assert sup.output(time.time() - 60) == ["x" * 40, "done"]


def test_only_the_new_versions_words_are_quoted_not_the_previous_daemons(tmp_path: Path) -> None:
    """Without an init system the previous daemon, started by an earlier watcher, writes daemon.out, and the new
    version it executes in place (SIGUSR1) keeps writing there; agent.log holds the previous daemon's lines up to
    its last words, some after the restart began (its stop): the job quotes what follows them only."""
    paths = Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    status = paths.state_dir / "daemon.json"
    new = tmp_path / "new.py"
    new.write_text(
        "import json, os, sys, time\n"
        f"json.dump({{'pid': os.getpid(), 'started': time.time(), 'version': '0.1.1'}}, open({str(status)!r}, 'w'))\n"
        "time.sleep(0.5)\n"
        "sys.exit('mobility 0.1.1: cannot load its configuration')\n"
    )
    again = f"os.execv(sys.executable, [sys.executable, {str(new)!r}, *sys.argv[1:]])"
    old = (
        "import json, os, signal, sys, time\n"
        f"signal.signal(signal.SIGUSR1, lambda *_: {again})\n"
        "print('mobility 0.1.0: the previous version speaking', flush=True)\n"
        f"json.dump({{'pid': os.getpid(), 'started': time.time(), 'version': '0.1.0'}}, open({str(status)!r}, 'w'))\n"
        "time.sleep(30)\n"
    )
    earlier = NoSupervisor(paths, [sys.executable, "-c", old, "mobility", "run", "--root", str(tmp_path)])
    earlier.restart()  # an earlier watcher started the previous version into daemon.out
    daemon = earlier._children[0]
    try:
        deadline = time.monotonic() + 10
        while not (status.exists() and json.loads(status.read_text() or "{}").get("version") == "0.1.0"):
            assert time.monotonic() < deadline, "the previous version did not start"
            time.sleep(0.05)
        since = time.time()
        paths.agent_log.write_text(
            log_line(since - 0.5, "heartbeat sent (the previous version, before the switch)")
            + log_line(since + 0.1, "stopping replication (the previous version, after the restart began)")
            + log_line(since + 0.1, last_words("0.1.0", "starts again"))
            + log_line(since + 0.2, "mobility 0.1.1 daemon started", "INFO")
            + log_line(since + 0.3, "replication failed to start", "ERROR")
        )
        u = updater(tmp_path, NoSupervisor(paths, ["false"]))
        u.supervisor.mark()
        u.supervisor.restart()  # SIGUSR1: the previous daemon executes the new version in place
        daemon.wait(timeout=20)
        evidence = u._evidence(restarted(since))
    finally:
        daemon.kill()
        daemon.wait()
    assert "cannot load its configuration" in evidence and "replication failed to start" in evidence
    assert "previous version" not in evidence and "its last line" not in evidence
    assert os.path.getsize(paths.daemon_output) > 0 and "previous version" in paths.daemon_output.read_text()


def test_the_previous_daemons_lines_end_at_its_last_line_and_only_its_own() -> None:
    said = ["old: stopping on signal 15", last_words("0.1.0", "stopped"), "new: started", "new: failed"]
    assert after_last_words(said, "0.1.0") == ["new: started", "new: failed"]
    # The new version's own last line is not the previous one's; a daemon killed (or older) said none: all is kept.
    ended = [*said[2:], last_words("0.1.1", "stopped")]
    assert after_last_words(ended, "0.1.0") == ended
    assert after_last_words(["old: stopping", "new: failed"], "0.1.0") == ["old: stopping", "new: failed"]
