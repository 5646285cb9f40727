"""Pure parsers for the release files of systems that predate os-release."""

from __future__ import annotations

import re

from agent.host.os_release import parse_os_release

_VERSION = re.compile(r"\d+(?:\.\d+)*")
_SUSE_KEY = re.compile(r"^\s*([A-Z_]+)\s*=\s*(.*?)\s*$")


def numeric_version(text: str | None) -> tuple[int, ...] | None:
    """The leading dotted number of ``text`` as a tuple ("7.9.2009" -> (7, 9, 2009)), or None."""
    if not text:
        return None
    m = _VERSION.match(text.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else None


def parse_suse_release(text: str) -> dict[str, str]:
    """/etc/SuSE-release: a name line, then ``VERSION = 11`` and ``PATCHLEVEL = 4`` lines."""
    lines = text.splitlines()
    info: dict[str, str] = {}
    if lines and "=" not in lines[0]:
        info["NAME"] = lines[0].strip()
    for line in lines:
        m = _SUSE_KEY.match(line)
        if m:
            info[m.group(1)] = m.group(2)
    return info


def parse_lsb_release(text: str) -> dict[str, str]:
    """/etc/lsb-release: ``DISTRIB_ID``, ``DISTRIB_RELEASE`` ... in os-release syntax."""
    return parse_os_release(text)


def parse_debian_version(text: str) -> str | None:
    """/etc/debian_version: "12.5" on a release, "bookworm/sid" on testing; None if empty."""
    first = text.strip().splitlines()
    return first[0].strip() if first and first[0].strip() else None


# Names in the first line of redhat-style release files, normalised to os-release IDs.
_LEGACY_NAMES: tuple[tuple[str, str], ...] = (
    ("red hat enterprise linux", "rhel"),
    ("centos", "centos"),
    ("oracle linux", "ol"),
    ("rocky linux", "rocky"),
    ("almalinux", "almalinux"),
    ("scientific linux", "scientific"),
    ("amazon linux", "amzn"),
    ("suse linux enterprise server", "sles"),
    ("opensuse", "opensuse"),
)


def legacy_id(name: str, fallback: str) -> str:
    """The os-release ID for a release file whose first line names ``name``."""
    low = name.lower()
    return next((os_id for needle, os_id in _LEGACY_NAMES if needle in low), fallback.lower())
