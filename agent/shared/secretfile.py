"""Secrets come from root-only files, never from arguments: the agent's passphrase or token (-P, bootstrap.conf)
and the server's push password (--password-file) are read here."""

from __future__ import annotations

import os
from pathlib import Path

from agent.shared.errors import PassphraseFileError
from agent.shared.fsutil import NotSmallRegularFile, read_small_file

MAX_SECRET_BYTES = 4096  # a passphrase or a token is well under 100 bytes


def read_secret_file(path: Path) -> str:
    """The secret in ``path``: a small regular file private to its owner (root's when read as root), text.

    The file is input: a FIFO, a device (/dev/zero), a directory or a huge file is refused before it is read,
    never waited on or read without bound.
    """
    try:
        st, data = read_small_file(path, MAX_SECRET_BYTES)
    except OSError as e:
        raise PassphraseFileError(f"cannot read the passphrase file {path}: {e.strerror}") from e
    except NotSmallRegularFile as e:
        raise PassphraseFileError(f"the passphrase file {e}") from e
    if st.st_mode & 0o077:
        raise PassphraseFileError(f"{path} is readable by others than its owner (mode {st.st_mode & 0o777:o})")
    if os.geteuid() == 0 and st.st_uid != 0:
        raise PassphraseFileError(f"{path} is not owned by root")
    try:
        text = data.decode().strip()
    except UnicodeDecodeError as e:
        raise PassphraseFileError(f"the passphrase file {path} is not text") from e
    if not text:
        raise PassphraseFileError(f"the passphrase file {path} is empty")
    return text
