"""`mobility bootstrap --root` against a real configuration server serving the real, packaged bundles."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest

from tests import faults
from tests.conftest import REPO, require_root
from tests.integration.serverproc import (
    ServerProcess,
    agent_cli,
    sandbox_root,
    secret_file,
    server_cli,
    start_server,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, dist: Path) -> Iterator[ServerProcess]:
    data = tmp_path / "data"
    s = start_server(data)
    try:
        bundles = [str(b) for b in dist.glob("*.tar.gz") if "_DEBIAN12-64_" in b.name or "_DEBIAN11-64_" in b.name]
        server_cli(data, "repo", "add", *bundles, check=True)
        yield s
    finally:
        s.stop()


def template(
    server: ServerProcess,
    where: Path,
    machine_id: str,
    tree: str = "debian12",
    fingerprint: str | None = None,
    secret: str | None = None,
) -> Path:
    """A machine made from a template: release files, machine-id, bootstrap.conf and a passphrase file."""
    root = sandbox_root(where, machine_id, tree)
    conf = root / "etc" / "mobility"
    conf.mkdir(parents=True, exist_ok=True)
    secret_file(conf / "passphrase", secret or server.passphrase())
    (conf / "bootstrap.conf").write_text(
        f"# baked into the template\nserver = {server.address}\n"
        f"fingerprint = {fingerprint or server.fingerprint}\npassphrase_file = /etc/mobility/passphrase\n"
        "retry_for = 3\n"
    )
    return root


def bootstrap(root: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    r = agent_cli("bootstrap", "--root", str(root), "--json", *extra)
    doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, doc, r.stderr


def error_id(doc: dict[str, object]) -> object:
    err = doc.get("error")
    return err.get("code") if isinstance(err, dict) else None


def installed(root: Path) -> bool:
    return (root / "usr/local/mobility/current/.complete").exists()


def test_fresh_bootstrap_then_noop_then_clone(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "m1", "a1" * 16)
    code, out, err = bootstrap(root)
    assert (code, out.get("state")) == (0, "succeeded"), err
    host_id = out["host_id"]
    assert installed(root)
    unit = root / "etc/systemd/system/mobility.service"
    assert "ExecStart=/usr/local/mobility/current/mobility/mobility run" in unit.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/mobility.service").is_symlink()
    assert (root / "etc/mobility/freeze.d").is_dir()
    assert "bootstrap [6/6] start the daemon" in (root / "var/log/mobility/install.log").read_text()
    (job,) = server.jobs()
    assert (job["state"], job["kind"], job["host_id"]) == ("succeeded", "install", host_id)

    # At the next boot nothing is reinstalled.
    start = time.monotonic()
    code, out, _ = bootstrap(root)
    assert (code, out["state"], out["host_id"]) == (0, "current", host_id)
    assert time.monotonic() - start < 5
    assert len(server.jobs()) == 1

    # A copy of the machine with its own machine-id enrols as a new machine, marked as a clone.
    clone = tmp_path / "clone"
    subprocess.run(["cp", "-a", str(root), str(clone)], check=True)
    (clone / "etc/machine-id").write_text("b2" * 16 + "\n")
    code, out, err = bootstrap(clone)
    assert code == 0, err
    assert out["host_id"] != host_id
    machines = {m["host_id"]: m["cloned_from"] for m in server.machines()}
    assert machines == {host_id: None, out["host_id"]: host_id}


def test_server_unreachable_exits_75_and_a_later_run_converges(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "m", "a2" * 16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    start = time.monotonic()
    code, out, err = bootstrap(root, "-i", f"127.0.0.1:{dead}", "--retry-for", "2")
    assert (code, error_id(out)) == (75, "SERVER-UNREACHABLE"), err
    assert 2 <= time.monotonic() - start < 20  # retried with backoff, within the bound
    assert not installed(root)
    code, out, err = bootstrap(root)
    assert (code, out.get("state")) == (0, "succeeded"), err


def test_wrong_fingerprint_and_wrong_passphrase(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "a", "a3" * 16, fingerprint="sha256:" + "0" * 64)
    code, out, _ = bootstrap(root)
    assert (code, error_id(out)) == (1, "SERVER-FINGERPRINT-MISMATCH")
    assert not installed(root) and not (root / "var/lib/mobility/identity.json").exists()
    root = template(server, tmp_path / "b", "a4" * 16, secret="not-the-passphrase")
    code, out, _ = bootstrap(root)
    assert (code, error_id(out)) == (1, "ENROL-BAD-PROOF")
    assert not (root / "var/lib/mobility/identity.json").exists()


def test_unsupported_os_is_reported_as_a_failed_job(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "m", "a5" * 16, tree="fedora30")
    code, out, _ = bootstrap(root)
    assert (code, error_id(out)) == (3, "OS-UNSUPPORTED")
    assert not installed(root)


def test_too_little_space_fails_prerequisites_and_is_reported(server: ServerProcess, tmp_path: Path) -> None:
    require_root()
    root = template(server, tmp_path / "m", "a6" * 16)
    with ExitStack() as stack:
        small = mount_small_fs(stack, tmp_path / "small.img", root / "usr" / "local", 48)
        assert small
        code, out, _ = bootstrap(root)
        assert (code, error_id(out)) == (3, "PREREQ-FAILED")
        assert "PRQ-FREE-SPACE" in str(out["error"])
        assert not installed(root)
    (job,) = server.jobs()
    assert (job["state"], job["error_id"]) == ("failed", "PREREQ-FAILED")  # reported with a proof, no certificate


def mount_small_fs(stack: ExitStack, image: Path, where: Path, mib: int) -> str:
    with image.open("wb") as f:
        f.truncate(mib * 1024 * 1024)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    stack.callback(subprocess.run, ["losetup", "--detach", dev], check=False)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", dev, str(where)], check=True)
    stack.callback(subprocess.run, ["umount", str(where)], check=False)
    return dev


def test_disk_full_while_unpacking_leaves_nothing_half_done(server: ServerProcess, tmp_path: Path) -> None:
    require_root()
    root = template(server, tmp_path / "m", "a7" * 16)
    with ExitStack() as stack:
        # The state directory (downloads, staging) fits the 13 MiB bundle but not its 31 MiB of content.
        mount_small_fs(stack, tmp_path / "state.img", root / "var" / "lib" / "mobility", 24)
        code, out, _ = bootstrap(root)
        assert (code, error_id(out)) == (1, "INSTALL-FAILED")
        assert not (root / "var/lib/mobility/staging").exists() or not any(
            (root / "var/lib/mobility/staging").rglob("*")
        )
        assert not installed(root)


def test_tampered_bundle_is_refused_and_the_previous_install_stays(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "m", "a8" * 16)
    assert bootstrap(root)[0] == 0
    before = os.readlink(root / "usr/local/mobility/current")
    (root / "etc/machine-id").write_text("c8" * 16 + "\n")  # a clone: it will fetch again
    shutil.rmtree(root / "var/lib/mobility/downloads")
    (served,) = (server.data / "repository").glob("*_DEBIAN12-64_*")
    data = bytearray(served.read_bytes())
    data[len(data) // 3] ^= 0x55
    served.write_bytes(bytes(data))
    code, out, _ = bootstrap(root)
    assert (code, error_id(out)) == (1, "TUF-TAMPERED")
    assert os.readlink(root / "usr/local/mobility/current") == before and installed(root)


def test_a_second_bootstrap_at_the_same_time_waits_its_turn(server: ServerProcess, tmp_path: Path) -> None:
    root = template(server, tmp_path / "m", "a9" * 16)
    lock = root / "var/lib/mobility/install.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, _ = bootstrap(root)
    assert (code, error_id(out)) == (75, "INSTALL-BUSY")
    assert not installed(root)


def test_read_only_install_dir(server: ServerProcess, tmp_path: Path) -> None:
    require_root()
    root = template(server, tmp_path / "m", "aa" * 16)
    target = root / "usr" / "local" / "mobility"
    target.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(target), str(target)], check=True)  # read-only, with plenty of space
    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    try:
        code, out, _ = bootstrap(root)
    finally:
        subprocess.run(["umount", str(target)], check=False)
    assert (code, error_id(out)) == (1, "INSTALL-FAILED")


def test_connection_dropped_mid_download_then_converges(server: ServerProcess, tmp_path: Path) -> None:
    proxy = CuttingProxy(server.port, cut_after=2 * 1024 * 1024)
    try:
        root = template(server, tmp_path / "m", "ab" * 16)
        code, out, _ = bootstrap(root, "-i", f"127.0.0.1:{proxy.port}", "--retry-for", "2")
        assert (code, error_id(out)) == (75, "TUF-FETCH-FAILED")
        assert not installed(root)
        assert not list((root / "var/lib/mobility/downloads").glob("*.tar.gz"))  # no half bundle kept
    finally:
        proxy.close()
    code, out, err = bootstrap(root)
    assert (code, out.get("state")) == (0, "succeeded"), err


def test_bootstrap_with_a_copied_bundle_reports_under_the_given_job(
    server: ServerProcess, dist: Path, tmp_path: Path
) -> None:
    """What push install runs remotely: the bundle is already there, the server made the job and a token."""
    import tarfile
    import uuid

    root = template(server, tmp_path / "m", "ad" * 16)
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "b", filter="tar")
    job_id = str(uuid.uuid4())
    code, out, err = bootstrap(root, "--bundle", str(tmp_path / "b"), "--job-id", job_id)
    assert (code, out.get("state"), out.get("job_id")) == (0, "succeeded", job_id), err
    log = (root / "var/log/mobility/install.log").read_text()
    assert f"take the bundle the server copied to {tmp_path / 'b'}" in log
    assert "fetch and verify" not in log and not (root / "var/lib/mobility/downloads").exists()
    (job,) = server.jobs()
    assert (job["job_id"], job["state"], job["host_id"]) == (job_id, "succeeded", out["host_id"])
    assert (tmp_path / "b/bundle.json").exists()  # the caller's copy is the caller's to remove

    code, _, err = bootstrap(root, "--job-id", "not-a-uuid")
    assert (code, err.split(":")[0]) == (2, "error USAGE")


def test_bundle_for_another_os_tag_is_refused(dist: Path, tmp_path: Path) -> None:
    import tarfile

    root = sandbox_root(tmp_path / "m", "ac" * 16)
    (other,) = dist.glob("*_DEBIAN11-64_*.tar.gz")
    with tarfile.open(other) as tar:
        tar.extractall(tmp_path / "b", filter="tar")
    r = agent_cli("install", "--bundle", str(tmp_path / "b"), "-r", "MS", "-v", "VmWare", "-q", "--root", str(root))
    assert (r.returncode, r.stderr.split(":")[0]) == (3, "error BUNDLE-WRONG-OS")
    assert not installed(root)


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 6])
def test_killed_at_any_step_the_next_run_converges(server: ServerProcess, tmp_path: Path, step: int) -> None:
    root = template(server, tmp_path / "m", f"{step:02d}" * 16)
    r = agent_cli("bootstrap", "--root", str(root), env=faults.environment(kill={"bootstrap.step": step}))
    assert r.returncode == -9, r.stderr
    log = root / "var/log/mobility/install.log"
    assert not log.exists() or f"bootstrap [{step}/6]" not in log.read_text()  # killed as the step began
    code, out, err = bootstrap(root)
    assert (code, out.get("state")) == (0, "succeeded"), err
    assert installed(root)
    assert not list((root / "usr/local/mobility/versions").glob(".*"))  # no half-installed version left
    code, out, _ = bootstrap(root)
    assert (code, out["state"]) == (0, "current")


class CuttingProxy:
    """A TCP proxy on loopback that drops each connection after ``cut_after`` bytes from the server."""

    def __init__(self, upstream: int, cut_after: int) -> None:
        self.upstream, self.cut_after = upstream, cut_after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            threading.Thread(target=self._pipe, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, self.cut_after), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    break
        except OSError:
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


def test_install_asks_on_a_terminal_and_refuses_without_one(dist: Path, tmp_path: Path) -> None:
    import pty
    import select
    import tarfile

    root = sandbox_root(tmp_path / "m", "ad" * 16)
    (bundle,) = dist.glob("*_DEBIAN12-64_*.tar.gz")
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "b", filter="tar")
    # No terminal and no -r/-v: a clear usage error, nothing installed.
    r = agent_cli("install", "--bundle", str(tmp_path / "b"), "--root", str(root))
    assert (r.returncode, r.stderr.split(":")[0]) == (2, "error USAGE")
    assert not installed(root)

    # On a terminal it asks for the role and the platform, then installs.
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "install", "--bundle", str(tmp_path / "b"), "--root", str(root)],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=REPO,
    )
    os.close(secondary)
    seen = b""
    answers = [(b"Role of this machine", b"MT\n"), (b"Platform", b"azure\n")]
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                seen += os.read(primary, 4096)
            except OSError:
                break
        if answers and answers[0][0] in seen:
            os.write(primary, answers.pop(0)[1])
    proc.wait(timeout=30)
    os.close(primary)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert b"installed Mobility" in seen
    record = json.loads((root / "etc/mobility/agent.json").read_text())
    assert (record["role"], record["platform"]) == ("MT", "Azure")
