"""The command line as a user meets it: exit codes, one-line errors with a fix, JSON, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DISTROS, REPO


def mobility(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_detect_os_text_and_json() -> None:
    r = mobility("detect-os", "--root", str(DISTROS / "ubuntu20"))
    assert (r.returncode, r.stdout.strip()) == (0, "UBUNTU-20.04")
    r = mobility("detect-os", "--root", str(DISTROS / "oracle7"), "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0
    assert data["os_tag"] == "OL7"
    assert {"os_tag", "id", "version", "pretty_name", "arch"} <= data.keys()


def test_unsupported_exits_3_with_list() -> None:
    r = mobility("detect-os", "--root", str(DISTROS / "fedora30"))
    assert r.returncode == 3
    assert r.stderr.startswith("error OS-UNSUPPORTED: ")
    assert "fix: " in r.stderr and "UBUNTU-24.04" in r.stderr
    assert "Traceback" not in r.stderr


def test_refused_tag_is_named_then_refused_with_exit_3() -> None:
    r = mobility("detect-os", "--root", str(DISTROS / "sles11sp4"))
    assert (r.returncode, r.stdout.strip()) == (3, "SLES11-SP4")
    assert r.stderr.startswith("error OS-KERNEL-TOO-OLD: SUSE Linux Enterprise Server 11 SP4 is SLES11-SP4, ")
    assert "Linux 3.0.101, older than 3.2" in r.stderr and "fix: " in r.stderr
    r = mobility("detect-os", "--json", "--root", str(DISTROS / "oracle6"))
    data = json.loads(r.stdout)
    assert (data["os_tag"], data["supported"], data["error"]["code"]) == ("OL6", False, "OS-KERNEL-TOO-OLD")
    r = mobility("detect-os", "--json", "--root", str(DISTROS / "ubuntu14"))
    assert (r.returncode, json.loads(r.stdout)["supported"]) == (0, True)


def test_root_that_does_not_exist(tmp_path: Path) -> None:
    r = mobility("detect-os", "--root", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.startswith("error ROOT-NOT-FOUND: ")


def test_root_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for cmd in ("detect-os", "prereq"):
        r = mobility(cmd, "--root", str(f))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error ROOT-NOT-DIR: ")
    assert f.read_text() == "x"


def test_json_error_is_machine_readable(tmp_path: Path) -> None:
    r = mobility("detect-os", "--json", "--root", str(tmp_path / "nope"))
    assert json.loads(r.stdout)["error"]["code"] == "ROOT-NOT-FOUND"


def test_bad_usage_is_exit_2_without_traceback() -> None:
    r = mobility("frobnicate")
    assert r.returncode == 2
    assert r.stderr.startswith("error USAGE: ")
    assert "Traceback" not in r.stderr


def test_prereq_on_a_release_file_tree_reports_every_check() -> None:
    r = mobility("prereq", "--json", "--root", str(DISTROS / "ubuntu22"))
    data = json.loads(r.stdout)
    ids = [c["id"] for c in data["checks"]]
    assert ids == [
        "PRQ-ROOT-USER",
        "PRQ-OS",
        "PRQ-ARCH",
        "PRQ-FREE-SPACE",
        "PRQ-KERNEL",
        "PRQ-INIT",
        "PRQ-BOOT-DISK",
        "PRQ-GRUB-DEVICE-NAMES",
    ]
    by_id = {c["id"]: c for c in data["checks"]}
    assert by_id["PRQ-OS"]["status"] == "PASS"
    # A tree of release files has no binaries: what cannot be known is UNKNOWN, never PASS.
    assert by_id["PRQ-ARCH"]["status"] == "UNKNOWN"
    assert by_id["PRQ-KERNEL"]["status"] == "UNKNOWN"  # the running kernel is not the root's


def test_prereq_kernel_floor_flag() -> None:
    r = mobility("prereq", "--json", "--kernel-floor", "99.0")  # the running machine, a floor no kernel meets
    by_id = {c["id"]: c for c in json.loads(r.stdout)["checks"]}
    assert (r.returncode, by_id["PRQ-KERNEL"]["status"], by_id["PRQ-KERNEL"]["threshold"]) == (3, "FAIL", "99.0")
    r = mobility("prereq", "--json")  # by default the floor of the C library this agent runs on
    kernel = {c["id"]: c for c in json.loads(r.stdout)["checks"]}["PRQ-KERNEL"]
    assert (kernel["status"], kernel["threshold"]) == ("PASS", "3.2")


def test_prereq_fails_with_exit_3_on_unsupported_os() -> None:
    r = mobility("prereq", "--root", str(DISTROS / "fedora30"))
    assert r.returncode == 3
    assert "FAIL     PRQ-OS" in r.stdout
    assert "error PREREQ-FAILED" in r.stderr


def test_bootstrap_binary_version() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from agent.cli import bootstrap_main; sys.exit(bootstrap_main(['--version']))",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0
    assert r.stdout.startswith("mobility-bootstrap ")


def test_install_and_bootstrap_refuse_a_refused_tag_before_touching_anything(tmp_path: Path) -> None:
    import shutil
    import tarfile

    from tests.bundle_factory import make_bundle

    root = tmp_path / "centos6"
    shutil.copytree(DISTROS / "centos6", root, symlinks=True)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with tarfile.open(make_bundle(tmp_path / "dl", "RHEL6")) as tar:
        tar.extractall(tmp_path / "bundle", filter="tar")
    r = mobility("install", "--bundle", str(tmp_path / "bundle"), "--root", str(root), "-r", "MS", "-v", "VmWare")
    assert (r.returncode, r.stderr.split(":")[0]) == (3, "error OS-KERNEL-TOO-OLD"), r.stderr
    assert "CentOS 6.7 is RHEL6, which is detected but refused" in r.stderr
    secret = tmp_path / "pass"
    secret.write_text("x" * 20 + "\n")
    secret.chmod(0o600)
    # Refused before the server (which does not exist) is contacted: exit 3, not 75.
    r = mobility("bootstrap", "--root", str(root), "-i", "127.0.0.1:1", "-P", str(secret), "--retry-for", "1")
    assert (r.returncode, r.stderr.split(":")[0]) == (3, "error OS-KERNEL-TOO-OLD"), r.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_uninstall_without_confirmation_removes_nothing(tmp_path: Path) -> None:
    (tmp_path / "etc/mobility").mkdir(parents=True)
    (tmp_path / "etc/mobility/agent.json").write_text("{}")
    r = mobility("uninstall", "--root", str(tmp_path))
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error CONFIRM-REQUIRED")
    assert (tmp_path / "etc/mobility/agent.json").exists()


def test_a_malformed_fingerprint_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    r = mobility(
        "configure", "--root", str(tmp_path), "-i", "cs.example.com", "-P", "/nonexistent", "--cs-fingerprint", "md5:1"
    )
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error FINGERPRINT-INVALID")
    assert "PASSPHRASE-FILE" not in r.stderr and not (tmp_path / "var").exists()


def test_the_local_commands_need_root(tmp_path: Path) -> None:
    """status, health and diagnostics read private state: another user is told so (exit 2), as root or not."""
    import os

    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    for command in ("status", "health", "diagnostics"):
        r = subprocess.run(
            [*drop, sys.executable, "-m", "agent", command, "--root", str(tmp_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert (r.returncode, r.stderr.split(":")[0]) == (2, "error ROOT-REQUIRED"), r.stderr


def test_status_and_health_on_a_machine_without_the_agent(tmp_path: Path) -> None:
    """Not installed is not CRITICAL with fixes for an installed agent: it is exit 3 (UNKNOWN to monitoring), and it
    points at `mobility bootstrap`."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(DISTROS / "debian12", root, symlinks=True)
    for command in ("status", "health"):
        for extra in ((), ("--json",)):
            r = mobility(command, "--root", str(root), *extra)
            assert r.returncode == 3, (command, r.stdout, r.stderr)
            if extra:
                assert json.loads(r.stdout)["error"]["code"] == "AGENT-NOT-INSTALLED"
            else:
                assert r.stderr.startswith("error AGENT-NOT-INSTALLED: Mobility is not installed")
                assert "mobility bootstrap" in r.stderr


def test_the_daemon_logs_to_stdout_only_when_that_is_the_journal_or_a_terminal(tmp_path: Path) -> None:
    """Elsewhere its stdout is a file (the SysV script's agent.log, the upgrade watcher's daemon.out) that must keep
    only what does not go through logging, such as a crash at start, and not grow with every log line."""
    probe = (
        "import logging\n"
        "from pathlib import Path\n"
        "from agent.cli import _daemon_logging\n"
        "from agent.host.paths import Paths\n"
        f"_daemon_logging(Paths(Path({str(tmp_path)!r})))\n"
        "logging.getLogger('mobility.test').info('a line of the log')\n"
    )
    out = tmp_path / "daemon.out"
    for journal in (False, True):
        with out.open("w") as f:
            st = Path(f.name).stat()
            env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
            if journal:
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            subprocess.run([sys.executable, "-c", probe], stdout=f, cwd=REPO, env=env, timeout=60, check=True)
        assert ("a line of the log" in out.read_text()) is journal
    assert (tmp_path / "var/log/mobility/agent.log").read_text().count("a line of the log") == 2
