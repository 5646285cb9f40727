"""Mobility: the source-machine side (bootstrapper, installer, daemon)."""

__version__ = "0.1.0"  # the sources' version; a frozen program carries the one it was built as (below)


def _built_version() -> str | None:
    """The version a frozen program was built as (`packaging/build --version`), from the VERSION file beside its
    modules: one PyInstaller build serves every version, which is data, not code. None when not frozen."""
    import re
    import sys

    home = getattr(sys, "_MEIPASS", None) if getattr(sys, "frozen", False) else None
    if home is None:
        return None
    try:
        with open(f"{home}/VERSION", "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9]+(?:\.[0-9]+)+", text) else None


__version__ = _built_version() or __version__
