"""server/process/commands.py: the process server's own runner for the tools a test failover uses."""

from __future__ import annotations

import pytest

from server.errors import FailoverToolMissing
from server.process.commands import TIMED_OUT, run_tool


def test_exit_statuses_are_returned_a_missing_tool_is_its_error_and_a_hung_one_times_out() -> None:
    r = run_tool(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(FailoverToolMissing):
        run_tool(["mobility-no-such-tool"], timeout=10)
    r = run_tool(["sleep", "5"], timeout=0.2)
    assert r.returncode == TIMED_OUT and "timed out" in r.stderr
