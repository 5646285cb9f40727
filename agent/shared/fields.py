"""Typed reads of one JSON object's fields, for every body of the wire (agent/shared/wire.py) and of replication
(agent/shared/replication_wire.py): each failure is a ``WireError`` that names the field, so the server answers 400
with what was wrong. Standard library only, like the rest of agent/shared/."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from agent.shared.textsafe import printable

# C0 and C1 control characters and DEL: a terminal escape or a newline in a hostname must never reach a log line
# or a table. Multi-line text (a job's detail) may keep \n and \t, nothing else.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class WireError(ValueError):
    """A request body that does not match its schema; the message names the field (the server answers 400)."""


class Fields:
    """Typed reads of one JSON object's fields; every failure is a WireError naming the field."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise WireError(f"{where} must be a JSON object")
        self.doc: Mapping[str, Any] = doc
        self.where = where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}"

    def text(
        self,
        key: str,
        limit: int,
        *,
        pattern: re.Pattern[str] | None = None,
        choices: tuple[str, ...] | None = None,
        lines: bool = False,
    ) -> str:
        value = self.doc.get(key)
        if not isinstance(value, str):
            raise WireError(f"{self._name(key)} must be a string")
        return check_text(value, self._name(key), limit, pattern=pattern, choices=choices, lines=lines)

    def optional_text(
        self, key: str, limit: int, *, pattern: re.Pattern[str] | None = None, lines: bool = False
    ) -> str | None:
        if self.doc.get(key) is None:
            return None
        return self.text(key, limit, pattern=pattern, lines=lines)

    def number(self, key: str) -> float:
        value = self.doc.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WireError(f"{self._name(key)} must be a finite number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.doc.get(key, False)
        if not isinstance(value, bool):
            raise WireError(f"{self._name(key)} must be true or false")
        return value

    def items(self, key: str, limit: int) -> list[Any]:
        value = self.doc.get(key, [])
        if not isinstance(value, list):
            raise WireError(f"{self._name(key)} must be a list")
        if len(value) > limit:
            raise WireError(f"{self._name(key)} has {len(value)} entries, more than {limit}")
        return value


def check_text(
    value: str,
    name: str,
    limit: int,
    *,
    pattern: re.Pattern[str] | None = None,
    choices: tuple[str, ...] | None = None,
    lines: bool = False,
) -> str:
    if len(value) > limit:
        raise WireError(f"{name} is longer than {limit} characters")
    if (_CONTROL_BUT_LINES if lines else _CONTROL).search(value):
        raise WireError(f"{name} holds control characters")
    if choices is not None and value not in choices:
        raise WireError(f"{name} must be one of {', '.join(choices)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise WireError(f"{name} {printable(value, 60)!r} is not well-formed")
    return value
