from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.cli import main, parse_duration
from server.errors import BadDuration


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("30m", 1800), (" 12h ", 43200), ("7d", 604800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0h", "12", "h", "1.5h", "-1d", "1w", "12 h", "1hm"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(BadDuration):
        parse_duration(text)


def test_init_remembers_a_sqlite_file_outside_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`init --database` is recorded for later commands, a SQLite file as well as a PostgreSQL URL (the SQLite file
    given relative to where init ran: recorded by its absolute path)."""
    data = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--data", str(data), "--database", "sqlite:///elsewhere.db"]) == 0
    assert (data / "database.url").read_text() == f"sqlite:///{tmp_path / 'elsewhere.db'}\n"
    monkeypatch.chdir(data)
    capsys.readouterr()
    assert main(["token", "create", "--ttl", "1h", "--data", str(data)]) == 0
    assert main(["machines", "--json", "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == []
    assert not (data / "mobility.db").exists() and os.path.getsize(tmp_path / "elsewhere.db") > 0


def test_init_records_nothing_for_the_data_directorys_own_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["init", "--data", str(data), "--database", f"sqlite:///{data / 'mobility.db'}"]) == 0
    assert not (data / "database.url").exists() and (data / "mobility.db").is_file()
