"""Which system is this? The support matrix and the detection that maps a root to an OS tag."""

from agent.distros.detect import OsFacts, OsInfo, classify, detect_os, gather_facts, require_supported
from agent.distros.matrix import BY_TAG, SUPPORT_MATRIX, SUPPORTED_ARCHES, Family, Init, Row

__all__ = [
    "BY_TAG",
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
