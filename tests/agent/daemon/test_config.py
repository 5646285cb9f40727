from __future__ import annotations

from pathlib import Path

import pytest

from agent.daemon.config import AgentConfig, load_config, parse_config
from agent.errors import ConfigInvalid
from agent.host.paths import Paths


def test_defaults_when_there_is_no_file(tmp_path: Path) -> None:
    assert load_config(Paths(tmp_path)) == AgentConfig()


def test_overrides(tmp_path: Path) -> None:
    (tmp_path / "etc" / "mobility").mkdir(parents=True)
    (tmp_path / "etc" / "mobility" / "mobility.conf").write_text('{"memory_budget_mib": 48, "metrics_port": 9100}')
    cfg = load_config(Paths(tmp_path))
    assert (cfg.memory_budget_mib, cfg.metrics_port, cfg.heartbeat_seconds) == (48, 9100, 30.0)


@pytest.mark.parametrize(
    "text",
    [
        '{"memory_budget": 1}',
        '{"memory_budget_mib": "64"}',
        '{"test_hooks": true}',  # the memory ballast this once switched on is gone (fault points replace it)
        '{"backlog_max": 0}',
        '{"metrics_port": 70000}',
        "[1]",
        "{not json",
    ],
)
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(ConfigInvalid):
        parse_config(text, "mobility.conf")
