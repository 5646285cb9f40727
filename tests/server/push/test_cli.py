"""`mobility-server push` refuses bad input with its ID before it connects anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import asyncssh
import pytest

from server.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("server") / "data"
    assert main(["init", "--data", str(d), "--name", "cs.example.com"]) == 0
    return d


def push(data: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["push", "--data", str(data), "--json", *args])
    out = capsys.readouterr().out
    doc = json.loads(out)
    return code, doc["error"]["code"] if "error" in doc else doc


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    return path


def test_no_hosts(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert push(data, capsys, "--key", str(key_file(tmp_path))) == (2, "PUSH-TARGET-INVALID")
    hosts = tmp_path / "hosts"
    hosts.write_text("# nothing yet\n")
    assert push(data, capsys, "--hosts-file", str(hosts), "--key", str(key_file(tmp_path)))[1] == "PUSH-TARGET-INVALID"
    code, err = push(data, capsys, "--hosts-file", str(tmp_path / "missing"), "--key", str(key_file(tmp_path)))
    assert (code, err) == (2, "PUSH-TARGET-INVALID")


def test_credentials_come_from_good_files_only(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encrypted = tmp_path / "enc"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(encrypted), "pkcs8-pem", passphrase="pw")
    for bad in (encrypted, tmp_path / "nope"):
        assert push(data, capsys, "--host", "web1", "--key", str(bad)) == (2, "PUSH-CREDENTIALS-INVALID")
    loose = tmp_path / "password"
    loose.write_text("hunter2\n")
    os.chmod(loose, 0o644)
    code, err = push(data, capsys, "--host", "web1", "--password-file", str(loose))
    assert (code, err) == (2, "PUSH-CREDENTIALS-INVALID")
    # Neither both nor none: argparse refuses.
    assert main(["push", "--data", str(data), "--host", "web1"]) == 2
    capsys.readouterr()


def test_bad_parallel_and_bad_host(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = str(key_file(tmp_path))
    assert push(data, capsys, "--host", "web1", "--key", key, "--parallel", "0") == (2, "USAGE")
    assert push(data, capsys, "--host", "web 1", "--key", key) == (2, "PUSH-TARGET-INVALID")


def test_the_default_server_address_is_the_first_name_of_its_certificate(data: Path) -> None:
    from server.datadir import DataDir
    from server.push.run import default_server_address

    assert default_server_address(DataDir(data)) == "cs.example.com:9443"
