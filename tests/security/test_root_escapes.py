"""Nothing the agent writes or removes under `--root` escapes the root (issue 11, item 6).

The root is an image whose directories are absolute links to a "host" directory beside it, as a root image copied
from a live system holds (etc/systemd/system -> /etc/systemd/system). A chroot follows such a link inside the root;
before, the agent followed it on the host: it wrote the host's units, state, logs and install directory, and
uninstall removed them. `-d /../x` installed beside the root."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.bundle_dir import unpack
from tests.bundle_factory import make_bundle
from tests.integration.serverproc import ServerProcess, secret_file, server_cli, start_server
from tests.security.sandbox import (
    FILES,
    error_id,
    install,
    make_root,
    mobility,
    snapshot,
    uninstall,
    unpacked_bundle,
)

LINKED = ("etc/systemd/system", "var/lib/mobility", "var/log/mobility", "etc/mobility", "usr/local")


def hostile_root(tmp_path: Path) -> tuple[Path, Path]:
    """(root, host): each of LINKED in the root is an absolute link to the same path under host."""
    host = tmp_path / "host"
    root = make_root(tmp_path / "root")
    for rel in LINKED:
        (host / rel).mkdir(parents=True, exist_ok=True)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(host / rel)  # absolute: /<tmp>/host/<rel>, which a chroot sees inside the root
    (host / "etc/mobility/keep.conf").write_text("the host's own\n")
    (host / "var/log/mobility/install.log").write_text("the host's log\n")
    return root, host


def inside(root: Path, host: Path, rel: str) -> Path:
    """Where a chroot puts ``rel`` when it follows the link to host: under the root, at host's path."""
    return root / str(host).lstrip("/") / rel


def test_install_and_uninstall_through_absolute_links_stay_inside_the_root(tmp_path: Path) -> None:
    root, host = hostile_root(tmp_path)
    before = snapshot(host)
    r = install(root, unpacked_bundle(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    assert snapshot(host) == before  # not one unit, log, state file or install dir on the "host"
    assert "ExecStart=" in inside(root, host, "etc/systemd/system/mobility.service").read_text()
    wants = inside(root, host, "etc/systemd/system/multi-user.target.wants/mobility.service")
    assert wants.is_symlink()
    assert (inside(root, host, "usr/local/mobility/current/mobility/mobility")).is_file()
    assert json.loads(inside(root, host, "etc/mobility/agent.json").read_text())["install_dir"] == "/usr/local/mobility"
    assert "install 0.1.0" in inside(root, host, "var/log/mobility/install.log").read_text()

    r = uninstall(root)
    assert r.returncode == 0, r.stderr
    assert snapshot(host) == before
    # The links in the root are removed as links (never followed); what they led to inside the root stays.
    done = json.loads(r.stdout)
    assert {"/etc/mobility", "/var/log/mobility", "/var/lib/mobility"} <= set(done["removed"])
    assert not (root / "etc/mobility").is_symlink() and not (root / "etc/mobility").exists()
    assert any("link /etc/mobility" in note for note in done["kept"])
    assert not inside(root, host, "etc/systemd/system/mobility.service").exists()
    assert not inside(root, host, "usr/local/mobility").exists()


def test_dot_dot_in_the_install_dir_never_leaves_the_root(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    r = install(root, unpacked_bundle(tmp_path / "bundle"), "-d", "/../x")
    assert (r.returncode, error_id(r)) == (2, "INSTALL-DIR-INVALID"), r.stderr
    assert not (tmp_path / "x").exists() and not (root / "x").exists()
    # Paths clamps '..' at the root as a chroot does, whatever a caller passes.
    paths = Paths(root)
    assert paths("/../x") == root / "x"
    assert paths.resolve("/../../usr/../../x/y") == root / "x" / "y"
    assert paths.install_dir("/../x") == root / "x"


def test_a_link_at_a_relative_escape_is_clamped_too(tmp_path: Path) -> None:
    root, host = hostile_root(tmp_path)
    (root / "usr/local").unlink()
    (root / "usr/local").symlink_to("../../../../../../../../../../" + str(host / "usr/local").lstrip("/"))
    before = snapshot(host)
    r = install(root, unpacked_bundle(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    assert snapshot(host) == before
    assert inside(root, host, "usr/local/mobility/.mobility-install").is_file()


def test_a_log_or_lock_file_that_is_a_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for rel in ("var/log/mobility/install.log", "var/lib/mobility/install.lock"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(victim)
    r = install(root, unpacked_bundle(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious\n"
    assert not (root / "var/log/mobility/install.log").is_symlink()
    assert "install 0.1.0" in (root / "var/log/mobility/install.log").read_text()


def test_unpacking_a_fetched_bundle_stays_inside_the_root(tmp_path: Path) -> None:
    root, host = hostile_root(tmp_path)
    before = snapshot(host)
    tarball = make_bundle(tmp_path / "dl", os_tag="DEBIAN12", files=FILES)
    staging = unpack(Paths(root), tarball)
    assert staging == inside(root, host, "var/lib/mobility/staging/0.1.0")
    assert (staging / "units/mobility.service").is_file()
    assert snapshot(host) == before


def test_template_prep_and_diagnostics_never_touch_the_host(tmp_path: Path) -> None:
    root, host = hostile_root(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text("the host's shadow file\n")
    (host / "var/lib/mobility/identity.json").write_text('{"host": "the host\'s identity"}')
    # Inside the root, a log that is a link to a file of the host.
    state = inside(root, host, "var/log/mobility")
    state.mkdir(parents=True)
    (state / "evil.log").symlink_to(secret)
    before = snapshot(host)
    r = mobility("template-prep", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert snapshot(host) == before
    assert secret.read_text() == "the host's shadow file\n"
    out = tmp_path / "diag.tar.gz"
    r = mobility("diagnostics", "--root", str(root), "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        text = b"".join(
            f.read() for m in tar.getmembers() if m.isfile() and (f := tar.extractfile(m)) is not None
        ).decode()
    assert "shadow" not in text and "the host's" not in text


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real configuration server on loopback publishing a (small, real) DEBIAN12 bundle."""
    s = start_server(tmp_path / "cs")
    try:
        bundle = make_bundle(tmp_path / "built", os_tag="DEBIAN12", files=FILES)
        server_cli(s.data, "repo", "add", str(bundle), check=True)
        yield s
    finally:
        s.stop()


@pytest.mark.integration
def test_bootstrap_in_a_root_of_absolute_links_stays_inside_it(server: ServerProcess, tmp_path: Path) -> None:
    """The whole lifecycle (fetch, verify, unpack, install, register, report) and template-prep and uninstall."""
    root, host = hostile_root(tmp_path)
    conf = inside(root, host, "etc/mobility")
    conf.mkdir(parents=True)
    secret_file(conf / "passphrase", server.passphrase())
    (conf / "bootstrap.conf").write_text(
        f"server = {server.address}\nfingerprint = {server.fingerprint}\n"
        "passphrase_file = /etc/mobility/passphrase\nretry_for = 3\n"
    )
    before = snapshot(host)
    r = mobility("bootstrap", "--root", str(root), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    assert snapshot(host) == before
    state = inside(root, host, "var/lib/mobility")
    assert {"identity.json", "client.key", "client.pem", "server-ca.pem", "last-job.json"} <= {
        p.name for p in state.iterdir()
    }
    assert list((state / "downloads").glob("*.tar.gz"))
    assert inside(root, host, "etc/systemd/system/mobility.service").is_file()

    r = mobility("template-prep", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert not (state / "client.key").exists()
    r = uninstall(root)
    assert r.returncode == 0, r.stderr
    assert snapshot(host) == before


@pytest.mark.integration
def test_push_style_bootstrap_installs_only_what_bundle_json_lists(server: ServerProcess, tmp_path: Path) -> None:
    """`./bootstrap` of a copied bundle (push install) takes the same verified copy as `install --bundle`."""

    def push_style(root: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
        (root / "etc/mobility").mkdir()
        secret_file(root / "etc/mobility/passphrase", server.passphrase())
        return mobility(
            "bootstrap",
            "--root",
            str(root),
            "-i",
            server.address,
            "--cs-fingerprint",
            server.fingerprint,
            "-P",
            "/etc/mobility/passphrase",
            "--bundle",
            str(bundle),
            "--json",
            timeout=120,
        )

    root = make_root(tmp_path / "root")
    bundle = unpacked_bundle(tmp_path / "bundle", files={**FILES, "planted": b"#!/bin/sh\nevil\n"}, listed=FILES)
    r = push_style(root, bundle)
    assert r.returncode == 0, r.stderr
    installed = root / "usr/local/mobility/versions/0.1.0"
    assert sorted(str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file()) == sorted(
        [*FILES, "bundle.json", ".complete"]
    )

    # A listed file that is a link out of the copied bundle: refused, nothing installed, the job says why.
    outside = tmp_path / "outside"
    outside.write_bytes(FILES["mobility/mobility"])
    linked = unpacked_bundle(tmp_path / "linked")
    (linked / "mobility/mobility").unlink()
    (linked / "mobility/mobility").symlink_to(outside)
    other = make_root(tmp_path / "other", machine_id="6f" * 16)
    r = push_style(other, linked)
    assert (r.returncode, error_id(r)) == (1, "BUNDLE-REFUSED"), r.stderr
    assert not (other / "usr/local/mobility/current").exists()
    failed = [j for j in server.jobs() if j["state"] == "failed"]
    assert [j["error_id"] for j in failed] == ["BUNDLE-REFUSED"]
