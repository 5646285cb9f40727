"""Untrusted text made safe to put in a message: quoted, escaped and short.

A member name, a link target or a manifest value from an archive ends up in an error line on an
operator's terminal and in logs; raw, it could be 256 MiB long or carry terminal escape sequences and
newlines that forge output. ``shown`` is the one way such text enters a message.
"""

from __future__ import annotations

SHOWN_CHARS = 200


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` quoted as repr() does (control characters, escapes and other unprintables as \\x.. escapes), at most
    about ``limit`` characters; a longer text is cut and says how long it was."""
    # repr() escapes exactly the characters str.isprintable() rejects (C0/C1 controls, ESC, DEL, bidi and
    # other format characters, line separators, lone surrogates from undecodable bytes), so what is left
    # prints as itself. Only the head is repr'd: the cost does not grow with the input.
    quoted = repr(text[: limit + 1])
    if len(text) <= limit and len(quoted) <= limit + 2:
        return quoted
    return f"{quoted[:limit]}... ({len(text)} characters)"


def printable(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` for a table cell or a log field: unquoted, every character ``shown`` would escape escaped the same
    way, at most ``limit`` characters (a longer text ends in an ellipsis)."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return out if len(text) <= limit and len(out) <= limit else out[: limit - 1] + "…"
