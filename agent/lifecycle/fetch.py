"""Fetch the installer bundle for this machine's OS tag, verified by the repository's TUF metadata.

Trust chains from the root metadata the server handed over at enrolment (``trusted_root``); the TLS
context pins the server's CA. python-tuf's ngclient does the verification; this module supplies the
transport (``http.client`` with the given context, bounded timeouts, chunked reads), picks the newest
bundle for the tag and turns python-tuf's exceptions into Mobility errors.

URL layout (the configuration server serves these)::

    {base_url}/v1/repo/metadata/{N}.root.json, timestamp.json, {N}.snapshot.json, {N}.targets.json
    {base_url}/v1/repo/targets/<bundle file name>
"""

from __future__ import annotations

import datetime
import http.client
import os
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent import __version__
from agent.errors import FetchWriteFailed, TufExpired, TufFetchFailed, TufNoBundle, TufRollback, TufTampered
from agent.lifecycle.bundles import parse_bundle_name
from agent.shared import wire
from agent.shared.errors import BundleRefused, MobilityError

METADATA_PATH = wire.REPO_METADATA_PATH + "/"
TARGETS_PATH = wire.REPO_TARGETS_PATH + "/"
TIMEOUT = 30.0  # seconds for connecting and for each read
DOWNLOAD_DEADLINE = 900.0  # seconds for one whole file: a bundle is tens of MiB
CHUNK = 64 * 1024
_HEADERS = {"User-Agent": f"mobility/{__version__}", "Accept-Encoding": "identity"}


class HttpsFetcher(FetcherInterface):
    """ngclient transport over ``http.client`` with Mobility's TLS context (pinned CA, client certificate)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = TIMEOUT,
        deadline: float = DOWNLOAD_DEADLINE,
        chunk_size: int = CHUNK,
    ) -> None:
        self._context = ssl_context
        self._timeout = timeout
        self._deadline = deadline
        self._chunk_size = chunk_size

    def _fetch(self, url: str) -> Iterator[bytes]:
        # Connect and read the status here, not in the generator: ngclient converts exceptions raised by
        # this call, and the HTTP status must be known before the first chunk.
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise tuf_errors.DownloadError(f"refusing to fetch {url}: only https:// URLs are used")
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, timeout=self._timeout, context=self._context
        )
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers=_HEADERS)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise tuf_errors.DownloadError(f"cannot fetch {url}: {e}") from e
        if response.status != http.HTTPStatus.OK:
            conn.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status} {response.reason}", response.status)
        return self._chunks(conn, response, url)

    def _chunks(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str
    ) -> Iterator[bytes]:
        deadline = time.monotonic() + self._deadline
        declared = response.getheader("Content-Length")
        received = 0
        try:
            while chunk := response.read(self._chunk_size):
                if time.monotonic() > deadline:
                    raise tuf_errors.SlowRetrievalError(f"{url}: download took more than {self._deadline:g} s")
                received += len(chunk)
                yield chunk
            # http.client's read(n) returns b"" when the peer closes early instead of raising: a dropped
            # connection must be a retryable download error, not a short file that fails its hash as "tampered".
            if declared is not None and declared.isdigit() and received < int(declared):
                raise tuf_errors.DownloadError(f"{url}: connection closed after {received} of {declared} bytes")
        except (OSError, http.client.HTTPException) as e:
            raise tuf_errors.DownloadError(f"{url}: download interrupted: {e}") from e
        finally:
            conn.close()


def _newest(targets: Targets, os_tag: str, version: str | None = None) -> str | None:
    """The name of the newest bundle (by version, then build date) for ``os_tag`` among signed targets; of
    ``version`` only when one is given (the newest build of it)."""
    candidates: list[tuple[tuple[tuple[int, ...], datetime.date], str]] = []
    for path in targets.targets:
        try:
            bundle = parse_bundle_name(path)
        except BundleRefused:
            continue  # not a bundle name: not ours to install
        if bundle.os_tag == os_tag and version in (None, bundle.version):
            candidates.append(((bundle.version_key, bundle.date), path))
    return max(candidates)[1] if candidates else None


def _convert(e: Exception, what: str) -> MobilityError:
    """python-tuf's exceptions as Mobility errors (the order matters: subclasses first)."""
    if isinstance(e, tuf_errors.ExpiredMetadataError):
        return TufExpired(f"{what}: repository metadata has expired ({e})")
    if isinstance(e, tuf_errors.BadVersionNumberError):
        return TufRollback(f"{what}: repository metadata went back in version ({e})")
    if isinstance(e, tuf_errors.UnsignedMetadataError):
        return TufTampered(f"{what}: repository metadata is not signed by the trusted keys ({e})")
    if isinstance(e, tuf_errors.LengthOrHashMismatchError | tuf_errors.DownloadLengthMismatchError):
        return TufTampered(f"{what}: a downloaded file differs from its signed length or sha256 ({e})")
    if isinstance(e, tuf_errors.RepositoryError | DeserializationError):
        return TufTampered(f"{what}: repository metadata is invalid ({e})")
    if isinstance(e, tuf_errors.DownloadError):
        return TufFetchFailed(f"{what}: {e}" + (f" ({e.__cause__})" if e.__cause__ else ""))
    if isinstance(e, OSError):
        return FetchWriteFailed(f"{what}: cannot write {e.filename or 'a file'}: {e.strerror or e}")
    raise e


def _refreshed_updater(
    base: str, ssl_context: ssl.SSLContext, trusted_root: bytes, metadata_dir: Path, dest_dir: Path, timeout: float
) -> Updater:
    metadata_dir.mkdir(parents=True, exist_ok=True)
    dest_dir.mkdir(parents=True, exist_ok=True)
    updater = Updater(
        metadata_dir=str(metadata_dir),
        metadata_base_url=base + METADATA_PATH,
        target_dir=str(dest_dir),
        target_base_url=base + TARGETS_PATH,
        fetcher=HttpsFetcher(ssl_context, timeout=timeout),
        # Targets keep their plain names on the server (server/releases/repository.py explains why).
        config=UpdaterConfig(prefix_targets_with_hash=False, app_user_agent=f"mobility/{__version__}"),
        bootstrap=trusted_root,
    )
    updater.refresh()
    return updater


def _newest_verified(metadata_dir: Path, os_tag: str, version: str | None = None) -> str | None:
    # refresh() verified targets.json and stored it; the list comes from that file, and the entry
    # used is the one get_targetinfo() takes from the verified metadata in memory.
    stored = Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
    return _newest(stored.signed, os_tag, version)


def newest_bundle(
    base_url: str,
    ssl_context: ssl.SSLContext,
    trusted_root: bytes,
    metadata_dir: Path,
    os_tag: str,
    *,
    timeout: float = TIMEOUT,
) -> str | None:
    """The name of the newest bundle for ``os_tag`` in the verified repository metadata (nothing downloaded)."""
    base = base_url.rstrip("/")
    try:
        _refreshed_updater(base, ssl_context, trusted_root, metadata_dir, metadata_dir, timeout)
        return _newest_verified(metadata_dir, os_tag)
    except MobilityError:
        raise
    except Exception as e:
        raise _convert(e, f"repository {base}") from e


def fetch_bundle(
    base_url: str,
    ssl_context: ssl.SSLContext,
    trusted_root: bytes,
    metadata_dir: Path,
    os_tag: str,
    dest_dir: Path,
    *,
    version: str | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """Download and verify the newest bundle for ``os_tag`` (of ``version``, when given: an upgrade fetches the
    version the server names, never just the newest); return its path in ``dest_dir``.

    ``metadata_dir`` keeps the verified metadata between runs: it is what makes a rolled-back
    repository detectable. A bundle already in ``dest_dir`` that matches the signed metadata is
    not downloaded again.
    """
    base = base_url.rstrip("/")
    what = f"repository {base}"
    try:
        updater = _refreshed_updater(base, ssl_context, trusted_root, metadata_dir, dest_dir, timeout)
        name = _newest_verified(metadata_dir, os_tag, version)
        wanted = f"{os_tag}" if version is None else f"{os_tag}, version {version}"
        if name is None:
            raise TufNoBundle(f"{what} has no installer bundle for {wanted}")
        info = updater.get_targetinfo(name)
        if info is None:  # pragma: no cover - the stored file is the verified one
            raise TufNoBundle(f"{what} has no installer bundle for {wanted}")
        dest = dest_dir / name
        cached = updater.find_cached_target(info, str(dest))
        if cached is not None:
            return dest
        _download(updater, info, dest)
        return dest
    except MobilityError:
        raise
    except Exception as e:  # python-tuf's failures are converted; _convert re-raises anything else
        raise _convert(e, what) from e


def _download(updater: Updater, info: TargetFile, dest: Path) -> None:
    """Download into a temporary file beside ``dest`` and rename: a killed download leaves no half bundle."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        updater.download_target(info, filepath=tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
