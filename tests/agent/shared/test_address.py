from __future__ import annotations

import pytest

from agent.shared.address import ServerAddress, parse_address
from agent.shared.errors import ServerAddressInvalid


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("cs.example.com", ServerAddress("cs.example.com", 9443), "cs.example.com:9443"),
        (" cs.example.com:443 ", ServerAddress("cs.example.com", 443), "cs.example.com:443"),
        ("10.0.0.5", ServerAddress("10.0.0.5", 9443), "10.0.0.5:9443"),
        ("[fd00::5]:8443", ServerAddress("fd00::5", 8443), "[fd00::5]:8443"),
        ("[fd00::5]", ServerAddress("fd00::5", 9443), "[fd00::5]:9443"),
        ("fd00::5", ServerAddress("fd00::5", 9443), "[fd00::5]:9443"),  # a bare IPv6 address: no port in it
        ("localhost:1", ServerAddress("localhost", 1), "localhost:1"),
    ],
)
def test_parse_address(text: str, expected: ServerAddress, shown: str) -> None:
    assert parse_address(text) == expected
    assert str(expected) == shown


def test_the_default_port_is_the_caller_s() -> None:
    assert parse_address("host", default_port=22) == ServerAddress("host", 22)


@pytest.mark.parametrize(
    "text",
    ["", "cs:", "cs:http", "cs:0", "cs:65536", "[fd00::5", "[fd00::5]8443", "[fd00::5]:x", "bad_name", "-a.b", "a b"],
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ServerAddressInvalid):
        parse_address(text)
