"""The template's settings for the bootstrapper, /etc/mobility/bootstrap.conf (read only: the image builder writes
it), merged with the flags of `mobility bootstrap`; diagnostics reads the same file through this one parser to know
which secrets to redact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BootstrapConfigInvalid
from agent.host.paths import Paths
from agent.lifecycle.install_dir import DEFAULT_INSTALL_DIR, InstallDir, parse_install_dir
from agent.shared.fsutil import NotSmallRegularFile, read_small_file


@dataclass(frozen=True)
class BootstrapSettings:
    server: str
    passphrase_file: str
    fingerprint: str | None = None
    install_dir: InstallDir = DEFAULT_INSTALL_DIR
    role: str = "MS"
    platform: str = "VmWare"
    retry_for: float = 120.0  # total time to keep trying an unreachable server before exit 75
    bundle: str | None = None  # an unpacked bundle to install instead of fetching one (push install copies it)
    job_id: str | None = None  # report under this job (push install creates it on the server first)


def parse_bootstrap_conf(text: str, source: str) -> dict[str, str]:
    """`key = value` lines; `#` comments. Pure."""
    known = {"server", "fingerprint", "passphrase_file", "install_dir", "role", "platform", "retry_for"}
    found: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise BootstrapConfigInvalid(f"{source}:{n}: expected one of {', '.join(sorted(known))} = value")
        found[key] = value.strip()
    return found


MAX_BOOTSTRAP_CONF = 64 * 1024  # a few lines


def read_bootstrap_conf(paths: Paths) -> str:
    """The text of bootstrap.conf: a small regular text file (a FIFO, a device or a huge file is refused)."""
    try:
        _, data = read_small_file(paths.bootstrap_conf, MAX_BOOTSTRAP_CONF)
        return data.decode()
    except (OSError, NotSmallRegularFile, UnicodeDecodeError) as e:
        raise BootstrapConfigInvalid(f"{paths.bootstrap_conf}: {getattr(e, 'strerror', None) or e}") from e


def passphrase_path(paths: Paths, value: str) -> Path:
    """Where ``passphrase_file`` is: an absolute one is a file of the root image, read as its chroot would."""
    if not Path(value).is_absolute() or paths.root == paths.root.parent:
        return Path(value)
    return paths.resolve(value)


def merged_settings(paths: Paths, flags: dict[str, Any]) -> BootstrapSettings:
    """bootstrap.conf, then the flags given on the command line (flags win)."""
    conf: dict[str, Any] = {}
    if paths.bootstrap_conf.exists():
        conf = dict(parse_bootstrap_conf(read_bootstrap_conf(paths), str(paths.bootstrap_conf)))
        if "install_dir" in conf:  # input like -d (which the command line parsed already)
            conf["install_dir"] = parse_install_dir(conf["install_dir"], f"install_dir in {paths.bootstrap_conf}")
    conf.update({k: v for k, v in flags.items() if v is not None})
    missing = [k for k in ("server", "passphrase_file") if not conf.get(k)]
    if missing:
        raise BootstrapConfigInvalid(f"no {' or '.join(missing)}: give -i/-P or set them in {paths.bootstrap_conf}")
    if "retry_for" in conf:
        try:
            conf["retry_for"] = float(conf["retry_for"])
        except ValueError as e:
            raise BootstrapConfigInvalid(f"retry_for = {conf['retry_for']!r} is not a number of seconds") from e
    return BootstrapSettings(**conf)
