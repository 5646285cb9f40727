"""Which system is this? The support matrix and the detection that maps a root to an OS tag."""

from agent.host.distros.detect import (
    MAX_RELEASE_FILE,
    RELEASE_FILES,
    RELEASE_GLOBS,
    OsFacts,
    OsInfo,
    classify,
    detect_os,
    gather_facts,
    require_supported,
)
from agent.host.distros.matrix import BY_TAG, SUPPORT_MATRIX, SUPPORTED_ARCHES, Family, Init, Row
from agent.host.libc import ARCH_PROBES

__all__ = [
    "ARCH_PROBES",
    "BY_TAG",
    "MAX_RELEASE_FILE",
    "RELEASE_FILES",
    "RELEASE_GLOBS",
    "SUPPORTED_ARCHES",
    "SUPPORT_MATRIX",
    "Family",
    "Init",
    "OsFacts",
    "OsInfo",
    "Row",
    "classify",
    "detect_os",
    "gather_facts",
    "require_supported",
]
