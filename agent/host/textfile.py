"""Reading the small text files (release files, configs) of a system root, safely."""

from __future__ import annotations

from agent.errors import ReleaseFileUnreadable
from agent.host.paths import Paths

MAX_TEXT_FILE = 64 * 1024  # release and config files are a few hundred bytes


def read_small_text(paths: Paths, system_path: str, limit: int = MAX_TEXT_FILE) -> str | None:
    """The text of ``system_path`` inside the root, or None if it does not exist.

    Raises ``ReleaseFileUnreadable`` when the file exists but cannot be read, is not a
    regular file, is larger than any such file would be, or is not text.
    """
    host = paths.resolve(system_path)
    if not host.exists():
        return None
    if not host.is_file():
        raise ReleaseFileUnreadable(f"{system_path} is not a regular file")
    try:
        with host.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ReleaseFileUnreadable(f"cannot read {system_path}: {e.strerror}") from e
    if len(data) > limit:
        raise ReleaseFileUnreadable(f"{system_path} is larger than {limit} bytes: not the expected text file")
    if b"\0" in data:
        raise ReleaseFileUnreadable(f"{system_path} holds binary data, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReleaseFileUnreadable(f"{system_path} is not UTF-8 text (byte {e.start})") from e
