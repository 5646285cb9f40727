from __future__ import annotations

import pytest

from agent.shared.address import ServerAddress
from server.errors import PushTargetInvalid
from server.push.targets import parse_hosts_file, parse_target, unique_targets


def test_ssh_port_is_the_default_and_ipv6_takes_brackets() -> None:
    assert parse_target("db1.example.com") == ServerAddress("db1.example.com", 22)
    assert parse_target("10.0.0.5:2222") == ServerAddress("10.0.0.5", 2222)
    assert parse_target("[fd00::5]:2200") == ServerAddress("fd00::5", 2200)
    assert parse_target("fd00::5") == ServerAddress("fd00::5", 22)
    assert str(parse_target("[fd00::5]:2200")) == "[fd00::5]:2200"


@pytest.mark.parametrize("bad", ["", "host:", "host:ssh", "host:70000", "[fd00::1", "bad_host!", "a b"])
def test_bad_targets_are_refused_with_the_source(bad: str) -> None:
    with pytest.raises(PushTargetInvalid) as e:
        parse_target(bad, "hosts.txt:3")
    assert e.value.id == "PUSH-TARGET-INVALID"
    assert e.value.message.startswith("hosts.txt:3: ")


def test_hosts_file_skips_comments_and_blank_lines_and_names_the_bad_line() -> None:
    text = "# rack 4\nweb1\n\n  web2:2222   # moved\n10.1.2.3\n"
    assert parse_hosts_file(text, "hosts") == [
        ServerAddress("web1", 22),
        ServerAddress("web2", 2222),
        ServerAddress("10.1.2.3", 22),
    ]
    with pytest.raises(PushTargetInvalid, match=r"^hosts:2: "):
        parse_hosts_file("web1\nweb 2\n", "hosts")


def test_each_host_once_in_the_order_given() -> None:
    targets = [parse_target(t) for t in ("b", "a", "b:22", "a:2222")]
    assert unique_targets(targets) == [ServerAddress("b", 22), ServerAddress("a", 22), ServerAddress("a", 2222)]
