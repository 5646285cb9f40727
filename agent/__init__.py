"""Mobility: the source-machine side (bootstrapper, installer, daemon)."""

__version__ = "0.1.0"
