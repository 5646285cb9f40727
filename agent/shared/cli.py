"""Command-line plumbing of `mobility`, `mobility-bootstrap` and `mobility-server`: an argparse that raises instead of
exiting, and the one `run()` that turns every MobilityError into `error <ID>: message`, its fix and the exit code."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from agent.shared.errors import BadArguments, Exit, IoFailed, MobilityError


class Parser(argparse.ArgumentParser):
    """argparse that raises a MobilityError (exit 2) instead of printing and exiting itself."""

    def error(self, message: str) -> NoReturn:
        raise BadArguments(f"{self.prog}: {message}")


def report_error(e: MobilityError, *, json_out: bool) -> int:
    """Print ``e`` (stderr: the ID, message and fix; stdout too as JSON with ``--json``); its exit code."""
    if json_out:
        print(json.dumps({"error": e.to_json()}, indent=2))
    print(e.diagnostics(), file=sys.stderr)
    return int(e.exit_code)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and dispatch; the one place a MobilityError becomes output and an exit code."""
    wants_json = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():
            # asyncssh (push's SSH client) imports algorithms its cryptography deprecates (DSA, cryptography 51), and
            # each import warned: nothing the person at the console can act on, in front of the command's own output
            # and errors. Only warnings raised in asyncssh's modules: any other (a coroutine never awaited in the
            # daemon) still reaches the log, and -W or PYTHONWARNINGS shows these too. (Matched by module, not by
            # cryptography's category: the bootstrapper's no-op run imports no cryptography.)
            if not sys.warnoptions:
                warnings.filterwarnings("ignore", module=r"asyncssh(\.|$)")
            args = parser.parse_args(argv)
            func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
            if func is None:
                parser.print_help()
                return Exit.USAGE
            return func(args)
    except MobilityError as e:
        return report_error(e, json_out=wants_json)
    except OSError as e:  # a file or disk problem no layer below turned into its own error: still one clear line
        return report_error(IoFailed.from_os_error(e), json_out=wants_json)
    except KeyboardInterrupt:
        return 130
