"""Test-only entry point of a deliberately broken agent, frozen by `packaging/build --test-entry` for the update
tests (tests/integration/test_updates.py). Never part of a release: only the suite passes --test-entry, and the
build keeps these programs apart from the release ones (packaging/build.py). What is broken depends on the version
the build packs (the version is data, so one PyInstaller build serves both):

- 0.1.2 crashes as its daemon starts: `mobility run` exits 1 before it does anything;
- 0.1.4 starts, healthy, but never reaches the server: every heartbeat fails as a broken TLS stack's would
  (bench/update.py's UPDATE-UNREACHABLE figure);
- any other version starts and reports CRITICAL: one more health check, HLT-BROKEN-BUILD, always fails.

Every other command works as the product's does (the watcher of a later upgrade runs the previous version's)."""

import contextlib
import sys

from agent import __version__
from agent.lifecycle.check_report import Result, Status

with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
    comm.write("mobility")

CRASHES = __version__ == "0.1.2"
UNREACHABLE = __version__ == "0.1.4"


class BrokenBuild:
    id = "HLT-BROKEN-BUILD"
    environment = False  # the agent's own doing: the gate rolls it back
    title = "broken build"
    remediation = "This is a deliberately broken test build: roll back."

    def run(self) -> Result:
        return Result(self.id, Status.FAIL, f"mobility {__version__} is a deliberately broken test build")


if sys.argv[1:2] == ["run"] and CRASHES:
    sys.exit(f"mobility {__version__}: a deliberately broken test build crashes at start")
elif sys.argv[1:2] == ["run"] and UNREACHABLE:
    import agent.daemon.loop
    from agent.errors import ServerUnreachable

    def heartbeat(self, body):  # type: ignore[no-untyped-def]
        raise ServerUnreachable(f"mobility {__version__} is a deliberately broken test build: it never gets through")

    agent.daemon.loop.ServerLink.heartbeat = heartbeat  # type: ignore[method-assign]
elif sys.argv[1:2] == ["run"]:
    import agent.daemon.health

    product_checks = agent.daemon.health.health_checks

    def health_checks(*args, **kwargs):  # type: ignore[no-untyped-def]
        return [*product_checks(*args, **kwargs), BrokenBuild()]

    agent.daemon.health.health_checks = health_checks  # type: ignore[assignment]

from agent.cli import main  # noqa: E402

sys.exit(main())
