"""The one run() of every command line: a MobilityError (or an OSError no layer turned into one) becomes
`error <ID>: message`, the fix and the exit code; never a traceback."""

from __future__ import annotations

import argparse
import errno
import json

import pytest

from agent.shared.cli import Parser, run
from agent.shared.errors import Exit, IoFailed


def _parser(action: object) -> Parser:
    parser = Parser(prog="tool")
    parser.add_argument("--json", action="store_true")

    def func(args: argparse.Namespace) -> int:
        if isinstance(action, BaseException):
            raise action
        return int(Exit.OK)

    parser.set_defaults(func=func)
    return parser


def test_an_os_error_nobody_converted_is_io_failed(capsys: pytest.CaptureFixture[str]) -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/var/lib/mobility/daemon.json")
    assert run(_parser(full), []) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"error IO-FAILED: /var/lib/mobility/daemon.json: No space left on device\n  fix: {IoFailed.remediation}\n"
    )


def test_json_errors_go_to_stdout_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_parser(PermissionError(errno.EACCES, "Permission denied")), ["--json"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["error"] == {
        "code": "IO-FAILED",
        "message": "Permission denied",
        "fix": IoFailed.remediation,
    }


def test_usage_errors_and_interrupts(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_parser(None), ["--nope"]) == 2
    assert capsys.readouterr().err.startswith("error USAGE: tool: unrecognized arguments: --nope")
    assert run(_parser(KeyboardInterrupt()), []) == 130
    assert run(_parser(None), []) == 0


def test_a_librarys_deprecated_algorithm_never_reaches_the_console(
    recwarn: pytest.WarningsRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What cryptography 51 did on every `mobility-server push` through asyncssh's import of its DSA classes.
    from cryptography.utils import CryptographyDeprecationWarning

    parser = Parser(prog="tool")

    def func(args: argparse.Namespace) -> int:
        import warnings

        # As asyncssh.crypto.misc's import raised it (the module a warning is attributed to is what the filter sees).
        warnings.warn_explicit(
            "DSA is deprecated", CryptographyDeprecationWarning, "asyncssh/crypto/misc.py", 32, "asyncssh.crypto.misc"
        )
        warnings.warn("coroutine 'x' was never awaited", RuntimeWarning, stacklevel=1)
        return int(Exit.OK)

    parser.set_defaults(func=func)
    monkeypatch.setattr("sys.warnoptions", [])
    assert run(parser, []) == 0
    # Any other warning still shows (in the daemon: its log).
    assert [str(w.message) for w in recwarn] == ["coroutine 'x' was never awaited"]
    recwarn.clear()
    # A developer who asks for warnings (-W, PYTHONWARNINGS) gets them all.
    monkeypatch.setattr("sys.warnoptions", ["default"])
    assert run(parser, []) == 0
    assert [str(w.message) for w in recwarn] == ["DSA is deprecated", "coroutine 'x' was never awaited"]
