"""Prerequisite checks: can the agent be installed on this system? The checks themselves are in
agent/lifecycle/prereq/prerequisites.py (`prerequisite_checks`); the package holds what the bootstrapper's at-boot no-op
and push need without them."""

from __future__ import annotations

from agent.lifecycle.install_dir import DEFAULT_INSTALL_DIR

# Free space the agent needs where it installs (PRQ-FREE-SPACE); push checks the same on a host before it copies.
MIN_FREE_BYTES = 100 * 1024 * 1024


__all__ = ["DEFAULT_INSTALL_DIR", "MIN_FREE_BYTES"]
