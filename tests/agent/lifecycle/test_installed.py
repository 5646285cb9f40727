"""agent.json has one owner: install saves it, everybody else loads it through agent/lifecycle/installed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.host.paths import Paths
from agent.lifecycle.installed import InstallRecord, load_install_record, save_install_record


def test_save_then_load(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    record = InstallRecord("0.2.0", "DEBIAN12", "/opt/mobility", "MS", "VmWare", "0.1.0")
    save_install_record(paths, record)
    assert load_install_record(paths) == record
    assert json.loads(paths.agent_config.read_text())["install_dir"] == "/opt/mobility"


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"text"', "null"])
def test_no_record_is_not_installed(tmp_path: Path, text: str) -> None:
    paths = Paths(tmp_path)
    assert load_install_record(paths) is None
    paths.agent_config.parent.mkdir(parents=True)
    paths.agent_config.write_text(text)
    assert load_install_record(paths) is None


def test_fields_of_the_wrong_type_are_absent_and_the_install_dir_stays_as_recorded(tmp_path: Path) -> None:
    """The recorded install directory is input for uninstall: a poisoned value is kept for install_dir.release to
    refuse, never replaced by the default directory."""
    paths = Paths(tmp_path)
    paths.agent_config.parent.mkdir(parents=True)
    paths.agent_config.write_text(json.dumps({"version": 3, "os_tag": "DEBIAN12", "install_dir": ["/opt"]}))
    record = load_install_record(paths)
    assert record == InstallRecord(None, "DEBIAN12", ["/opt"])


def test_a_fifo_or_a_huge_file_is_not_read(tmp_path: Path) -> None:
    import os

    paths = Paths(tmp_path)
    paths.agent_config.parent.mkdir(parents=True)
    os.mkfifo(paths.agent_config)
    assert load_install_record(paths) is None  # never blocks on a FIFO without a writer
    paths.agent_config.unlink()
    paths.agent_config.write_text(json.dumps({"version": "1", "pad": "x" * 70_000}))
    assert load_install_record(paths) is None
