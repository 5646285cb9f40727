"""Mobility configuration server (and, next phase, process server)."""

from agent import __version__

__all__ = ["__version__"]
