"""Installing a version beside the running one: a version that cannot read the machine's state is refused before
anything is removed, placed or switched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import UpdateStateFormat
from agent.lifecycle.bundles import STATE_FORMAT
from agent.update.beside import place_beside, state_format_here
from tests.bundle_factory import DEFAULT_FILES, manifest_for


def bundle_dir(where: Path, version: str, state_format: int | None) -> Path:
    where.mkdir(parents=True)
    doc = manifest_for("DEBIAN12", version, DEFAULT_FILES)
    if state_format is not None:
        doc["state_format"] = state_format
    (where / "bundle.json").write_text(json.dumps(doc))
    return where


def test_a_version_that_cannot_read_the_state_here_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    host = tmp_path / "usr/local/mobility"
    bundle_dir(host / "versions/0.2.0", "0.2.0", 2)  # runs here: it wrote state format 2
    bundle_dir(host / "versions/0.1.9", "0.1.9", 1)  # the previous version, the way back
    staging = bundle_dir(tmp_path / "staging/0.1.5", "0.1.5", 1)
    before = sorted(p.name for p in (host / "versions").iterdir())
    assert state_format_here(host, "0.2.0") == 2
    with pytest.raises(UpdateStateFormat) as refused:
        place_beside(host, staging, "0.2.0", "0.1.5", "DEBIAN12")
    assert "format 1" in refused.value.message and "format 2" in refused.value.message
    assert sorted(p.name for p in (host / "versions").iterdir()) == before  # nothing pruned, nothing placed


def test_the_state_format_of_a_version_from_before_formats_is_1_and_unreadable_is_this_programs(tmp_path: Path) -> None:
    host = tmp_path / "usr/local/mobility"
    bundle_dir(host / "versions/0.1.0", "0.1.0", None)
    assert state_format_here(host, "0.1.0") == 1
    assert state_format_here(host, "0.0.1") == STATE_FORMAT  # no bundle.json to read
