"""shown(): untrusted text in a message is quoted, escaped and short."""

from __future__ import annotations

import pytest

from agent.shared.textsafe import shown


def test_plain_text_reads_as_repr() -> None:
    assert shown("lib/mobility/agent.py") == "'lib/mobility/agent.py'"
    assert shown("it's") == '"it\'s"'


@pytest.mark.parametrize(
    "raw",
    [
        "\x1b]0;owned\x07",  # set the terminal title
        "\x1b[2J",  # clear the screen
        "\x9b31m",  # C1 CSI
        "a\nerror FORGED: ok",  # a forged line
        "a\rb",
        "evil\u202etxt.sh",  # right-to-left override
        "\u2028",  # line separator
        "bad\udcffbyte",  # an undecodable byte as tarfile hands it over (surrogateescape)
        "\x7f",
    ],
)
def test_control_characters_and_escapes_are_escaped(raw: str) -> None:
    out = shown(raw)
    assert out.isprintable() and out.isascii()
    assert "\n" not in out and "\x1b" not in out


def test_long_text_is_cut_and_says_how_long_it_was() -> None:
    out = shown("A" * 100_000)
    assert out.startswith("'AAAA") and out.endswith("... (100000 characters)")
    assert len(out) < 240


def test_escapes_count_towards_the_limit() -> None:
    out = shown("\x1b" * 1000)
    assert len(out) < 240 and "\x1b" not in out
    assert out.endswith("(1000 characters)")
    assert len(shown("\x1b" * 10)) == len(repr("\x1b" * 10))  # short: whole
