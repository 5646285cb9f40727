"""The bootstrapper's pure parts: bootstrap.conf, the merged settings, and the capped exponential backoff (its waits
drawn with full jitter: here the draw is pinned to the top of each bound; tests/agent/lifecycle/test_backoff.py
draws)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import BootstrapConfigInvalid, InstallDirInvalid, ServerUnreachable, TufFetchFailed
from agent.host.paths import Paths
from agent.lifecycle.backoff import BACKOFF_CAP
from agent.lifecycle.bootstrap import BootstrapSettings, with_backoff
from agent.lifecycle.bootstrap_conf import merged_settings, parse_bootstrap_conf, passphrase_path
from agent.lifecycle.install_dir import DEFAULT_INSTALL_DIR
from agent.shared.errors import MobilityError

CONF = """\
# baked into the template
server = cs.example.com:9443
fingerprint = sha256:0123   # pinned
passphrase-file = /etc/mobility/passphrase
install_dir=/opt/mobility
retry_for = 30
"""


def test_parse_bootstrap_conf() -> None:
    assert parse_bootstrap_conf(CONF, "bootstrap.conf") == {
        "server": "cs.example.com:9443",
        "fingerprint": "sha256:0123",
        "passphrase_file": "/etc/mobility/passphrase",
        "install_dir": "/opt/mobility",
        "retry_for": "30",
    }
    assert parse_bootstrap_conf("\n  # nothing\n", "x") == {}


@pytest.mark.parametrize("line", ["server", "token_file = /x", "passphrase = hunter2", "= value"])
def test_a_line_the_parser_does_not_know_is_refused_with_its_place(line: str) -> None:
    with pytest.raises(BootstrapConfigInvalid) as e:
        parse_bootstrap_conf(f"server = cs\n{line}\n", "/etc/mobility/bootstrap.conf")
    assert e.value.message.startswith("/etc/mobility/bootstrap.conf:2: expected one of ")


def _root(tmp_path: Path, conf: str | None) -> Paths:
    paths = Paths(tmp_path)
    if conf is not None:
        paths.config_dir.mkdir(parents=True)
        paths.bootstrap_conf.write_text(conf)
    return paths


def test_flags_win_over_the_conf(tmp_path: Path) -> None:
    paths = _root(tmp_path, CONF)
    settings = merged_settings(paths, {"server": "10.0.0.5", "role": None, "retry_for": None})
    assert settings == BootstrapSettings(
        server="10.0.0.5",
        passphrase_file="/etc/mobility/passphrase",
        fingerprint="sha256:0123",
        install_dir="/opt/mobility",  # type: ignore[arg-type]
        retry_for=30.0,
    )


@pytest.mark.parametrize(
    ("conf", "flags", "error"),
    [
        (None, {}, BootstrapConfigInvalid),  # neither server nor passphrase file
        ("server = cs\n", {}, BootstrapConfigInvalid),
        ("server = cs\npassphrase_file = /p\nretry_for = soon\n", {}, BootstrapConfigInvalid),
        ("server = cs\npassphrase_file = /p\ninstall_dir = /usr\n", {}, InstallDirInvalid),
    ],
)
def test_merged_settings_refuse_bad_input(
    tmp_path: Path, conf: str | None, flags: dict[str, str], error: type[MobilityError]
) -> None:
    with pytest.raises(error):
        merged_settings(_root(tmp_path, conf), flags)


def test_defaults(tmp_path: Path) -> None:
    settings = merged_settings(_root(tmp_path, None), {"server": "cs", "passphrase_file": "/p"})
    assert (settings.install_dir, settings.role, settings.platform, settings.retry_for) == (
        DEFAULT_INSTALL_DIR,
        "MS",
        "VmWare",
        120.0,
    )


def test_an_absolute_passphrase_file_is_the_root_image_s(tmp_path: Path) -> None:
    assert passphrase_path(Paths(tmp_path), "/etc/mobility/passphrase") == tmp_path / "etc/mobility/passphrase"
    assert passphrase_path(Paths(tmp_path), "relative/pass") == Path("relative/pass")
    assert passphrase_path(Paths(Path("/")), "/etc/mobility/passphrase") == Path("/etc/mobility/passphrase")


def _top(low: float, high: float) -> float:
    """The jitter's draw pinned to the top of its range: the waits are then the bounds themselves."""
    return high


class FakeTime:
    """The clock and sleep with_backoff takes: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_backoff_doubles_up_to_the_cap_and_returns_the_first_success() -> None:
    t, calls = FakeTime(), []

    def action() -> str:
        calls.append(t.now)
        if len(calls) < 8:
            raise ServerUnreachable("refused")
        return "ok"

    assert with_backoff("contacting", action, 600, t.sleep, t.clock, _top) == "ok"
    assert t.sleeps == [1, 2, 4, 8, 16, BACKOFF_CAP, BACKOFF_CAP]


def test_backoff_gives_up_within_the_time_it_was_given_with_the_same_error() -> None:
    t = FakeTime()

    def action() -> None:
        raise TufFetchFailed("HTTP 503")

    with pytest.raises(TufFetchFailed) as e:
        with_backoff("downloading the bundle", action, 10, t.sleep, t.clock, _top)
    assert t.sleeps == [1, 2, 4, 3]  # the last wait is cut to what is left
    assert t.now == 1010.0
    assert e.value.message == "HTTP 503 (gave up downloading the bundle after 10 s; a later run will retry)"


def test_backoff_does_not_retry_what_is_not_temporary() -> None:
    t = FakeTime()

    def action() -> None:
        raise BootstrapConfigInvalid("bad")

    with pytest.raises(BootstrapConfigInvalid):
        with_backoff("contacting", action, 60, t.sleep, t.clock)
    assert t.sleeps == []
