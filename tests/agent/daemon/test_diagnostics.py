"""Diagnostics never carry a secret: known secrets are planted everywhere the tarball collects from."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from agent.daemon.diagnostics import collect, redact
from agent.host.paths import Paths

PASSPHRASE = "correct-horse-battery-staple-42"
TOKEN = "mbt_AbCdEfGhIjKl_s3cr3t-t0k3n-value-xyz123"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----"


def test_redact_patterns() -> None:
    text = f'proof": "abcdef0123", nonce=xyz987, {TOKEN} {KEY} and {PASSPHRASE}'
    out = redact(text, [PASSPHRASE])
    for secret in ("abcdef0123", "xyz987", TOKEN, "MIGHAgEA", PASSPHRASE):
        assert secret not in out


def test_tarball_has_no_planted_secret(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    secret_file = tmp_path / "etc" / "mobility" / "passphrase"
    secret_file.write_text(PASSPHRASE + "\n")
    os.chmod(secret_file, 0o600)
    paths.bootstrap_conf.write_text("server = cs.example.com:9443\npassphrase_file = /etc/mobility/passphrase\n")
    (paths.config_dir / "mobility.conf").write_text(json.dumps({"memory_budget_mib": 64, "note": PASSPHRASE}))
    paths.log_dir.mkdir(parents=True)
    paths.agent_log.write_text(f"INFO enrolled with token {TOKEN}\nDEBUG proof=deadbeef99 passphrase {PASSPHRASE}\n")
    paths.state_dir.mkdir(parents=True)
    paths.client_key.write_text(KEY)
    (paths.state_dir / "identity.json").write_text(json.dumps({"host_id": "h1", "secret": "s3cr3tvalue"}))
    out = tmp_path / "diag.tar.gz"
    names = collect(paths, {"status": "healthy", "checks": []}, out)
    assert "logs/agent.log" in names and "config/mobility.conf" in names and "health.json" in names
    blob = b""
    with tarfile.open(out) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            blob += f.read() if f else b""
    for secret in (PASSPHRASE, TOKEN, "MIGHAgEA", "deadbeef99", "s3cr3tvalue"):
        assert secret.encode() not in blob, secret
    assert b"enrolled with token [REDACTED]" in blob  # the log line itself is kept
    assert out.stat().st_mode & 0o777 == 0o600


def test_the_secret_file_is_found_by_the_bootstrap_s_own_parser(tmp_path: Path) -> None:
    """bootstrap.conf is read by agent/lifecycle/bootstrap.py's parser: what it accepts (`passphrase-file` is its
    spelling of passphrase_file too) names the secret to redact; a conf it refuses names none, and collecting still
    works."""
    from agent.daemon.diagnostics import known_secrets

    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    secret_file = paths.config_dir / "passphrase"
    secret_file.write_text(PASSPHRASE + "\n")
    os.chmod(secret_file, 0o600)
    paths.bootstrap_conf.write_text("server = cs:9443\npassphrase-file = /etc/mobility/passphrase  # baked in\n")
    assert known_secrets(paths) == [PASSPHRASE]
    paths.bootstrap_conf.write_text("server = cs:9443\ntoken_file = /etc/mobility/passphrase\n")  # not a key it knows
    assert known_secrets(paths) == []
    names = collect(paths, {"status": "unknown", "checks": []}, tmp_path / "d.tar.gz")
    assert "config/bootstrap.conf" in names
