"""Install's versions side by side: the previous version is the way back, and nothing a failed copy leaves takes it."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle import install as install_module
from agent.lifecycle.install import activate_version, install
from agent.lifecycle.install_dir import DEFAULT_INSTALL_DIR
from tests.security.sandbox import make_root, unpacked_bundle


def versions(root: Path) -> set[str]:
    return {p.name for p in (root / "usr/local/mobility/versions").iterdir()}


def current(root: Path) -> str:
    return os.readlink(root / "usr/local/mobility/current")


def recorded(root: Path) -> dict[str, object]:
    return dict(json.loads((root / "etc/mobility/agent.json").read_text()))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


def put(root: Path, tmp_path: Path, version: str) -> None:
    install(Paths(root), unpacked_bundle(tmp_path / f"b-{version}-{len(list(tmp_path.iterdir()))}", version),
            DEFAULT_INSTALL_DIR, "MS", "VmWare")  # fmt: skip


def test_two_versions_at_most_the_running_and_the_previous(root: Path, tmp_path: Path) -> None:
    for v in ("0.1.0", "0.1.1", "0.1.2"):
        put(root, tmp_path, v)
    assert versions(root) == {"0.1.1", "0.1.2"}
    assert current(root) == "versions/0.1.2"
    assert recorded(root)["previous"] == "0.1.1"


def test_reinstalling_the_running_version_keeps_the_previous_one(root: Path, tmp_path: Path) -> None:
    """Before: install pruned with keep={version, previous} where previous was the running version itself, so a
    reinstall deleted the only rollback target."""
    put(root, tmp_path, "0.1.0")
    put(root, tmp_path, "0.1.1")
    put(root, tmp_path, "0.1.1")
    assert versions(root) == {"0.1.0", "0.1.1"}
    assert recorded(root)["previous"] == "0.1.0"
    assert current(root) == "versions/0.1.1"


def test_a_copy_that_fails_for_lack_of_space_leaves_the_running_version_and_no_leftovers(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(root, tmp_path, "0.1.0")
    real_copy = install_module.copy_verified

    def full_disk(*args: object, **kwargs: object) -> None:
        real_copy(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(install_module, "copy_verified", full_disk)
    with pytest.raises(Exception, match="No space left"):
        put(root, tmp_path, "0.1.1")
    assert versions(root) == {"0.1.0"}  # no partial copy left behind taking space
    assert current(root) == "versions/0.1.0"
    assert recorded(root)["version"] == "0.1.0"


def test_activating_the_previous_version_is_a_rollback(root: Path, tmp_path: Path) -> None:
    put(root, tmp_path, "0.1.0")
    put(root, tmp_path, "0.1.1")
    units = activate_version(Paths(root), DEFAULT_INSTALL_DIR, "0.1.0", None)
    assert current(root) == "versions/0.1.0"
    assert versions(root) == {"0.1.0"}  # the version rolled back from is not a way back
    assert recorded(root)["version"] == "0.1.0" and recorded(root)["previous"] is None
    assert recorded(root)["role"] == "MS"  # what install recorded stays
    assert "/etc/systemd/system/mobility.service" in units
