"""The `mobility-server` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from agent.cli import Parser, run
from server import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mobility-server", description="Mobility configuration server.")
    parser.add_argument("--version", action="version", version=f"mobility-server {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
