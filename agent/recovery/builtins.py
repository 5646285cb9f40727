"""The agent's own recovery checks (`BUILTINS`): `install_builtin_checks` writes a small script for each into
/etc/mobility/recovery.d/ that runs `mobility recovery-check --builtin NAME`, which an operator replaces or turns off
like any other check (agent/recovery/runner.py runs them all)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.host.paths import Paths
from agent.shared.fsutil import atomic_write

if TYPE_CHECKING:
    from agent.recovery.postgresql import PostgresqlCheck

BUILTIN_TIMEOUT = 540.0  # what a built-in gives itself when not told: it ends before a 600 s budget kills it
BUILTIN_HEADER = "#!/bin/sh\n# mobility: built-in recovery check\n"


def _postgresql() -> PostgresqlCheck:
    from agent.recovery.postgresql import PostgresqlCheck

    return PostgresqlCheck()


BUILTINS: dict[str, Callable[[], PostgresqlCheck]] = {"postgresql": _postgresql}
_ABOUT = {
    "postgresql": (
        "In a failover of this machine every PostgreSQL cluster starts and replays its WAL, `pg_amcheck --all`\n"
        "# passes and pgbench's balance invariant holds where its tables are; without PostgreSQL it says so and passes."
    )
}


def builtin_script(name: str, launcher: str) -> str:
    """The script in recovery.d that runs the built-in check ``name`` with the installed agent at ``launcher``."""
    return (
        f"{BUILTIN_HEADER}"
        f"# {_ABOUT[name]}\n"
        "# `mobility install` keeps this file while it starts with the two lines above: replace it with a check of\n"
        "# your own, or make it non-executable to turn it off (docs/recovery-checks.md).\n"
        f"exec {shlex.quote(launcher)} recovery-check --builtin {name} "
        f'--timeout "${{MOBILITY_CHECK_TIMEOUT:-{BUILTIN_TIMEOUT:.0f}}}"\n'
    )


def install_builtin_checks(paths: Paths, launcher: str) -> list[str]:
    """Write the built-in checks' scripts into recovery.d: new ones executable; one of ours rewritten keeping its
    mode (an operator who made it non-executable turned it off); one an operator replaced (another first lines) left
    alone. Returns the system paths written."""
    written = []
    directory = paths.recovery_dir
    directory.mkdir(parents=True, exist_ok=True)
    for name in BUILTINS:
        path = directory / name
        text = builtin_script(name, launcher)
        try:
            with path.open("rb") as f:
                head = f.read(len(BUILTIN_HEADER))
            mode: int | None = path.stat().st_mode & 0o777
        except FileNotFoundError:
            head, mode = None, None
        if head is not None and head != BUILTIN_HEADER.encode():
            continue  # the operator's own check of that name
        if head is not None and path.read_text(errors="replace") == text:
            continue
        atomic_write(path, text.encode(), 0o755 if mode is None else mode)
        written.append(paths.system_path(path))
    return written
