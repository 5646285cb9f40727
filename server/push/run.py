"""Push to many hosts at once: a job and a single-use enrolment token per host, at most N hosts at a time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncssh
from cryptography import x509

from agent.lifecycle.bundles import version_key
from agent.shared import wire
from agent.shared.address import ServerAddress
from agent.shared.errors import MobilityError
from agent.shared.fsutil import NotSmallRegularFile, read_small_file, sha256_file
from agent.shared.secretfile import read_secret_file
from server.api import pki
from server.api.enrolment import create_token
from server.database.connection import Database
from server.database.storage import Storage
from server.datadir import DataDir
from server.errors import PushCredentialsInvalid, PushInterrupted, PushNoBundle
from server.push.known_hosts import KnownHosts
from server.push.progress import Progress
from server.push.remote import STALE_AFTER, Bundle, Credentials, HostResult, PushSettings, push_host
from server.releases.repository import Repository

MAX_KEY_FILE = 64 * 1024  # an SSH private key is a few KiB
TOKEN_TTL = 3600.0  # a pushed host enrols within minutes; unused tokens are removed when its push ends


def load_credentials(user: str, key_file: str | None, password_file: str | None) -> Credentials:
    """The key or the password, from files only (never the command line)."""
    if key_file is not None:
        try:
            # Read bounded and without blocking (asyncssh would read a FIFO or /dev/zero for ever), then parsed.
            _, data = read_small_file(Path(key_file), MAX_KEY_FILE)
            return Credentials(user, key=asyncssh.import_private_key(data))
        except (OSError, NotSmallRegularFile, asyncssh.KeyImportError) as e:
            raise PushCredentialsInvalid(f"--key {key_file}: {getattr(e, 'strerror', None) or e}") from e
    if password_file is None:
        raise PushCredentialsInvalid("give --key FILE or --password-file FILE")
    try:
        return Credentials(user, password=read_secret_file(Path(password_file)))
    except MobilityError as e:
        raise PushCredentialsInvalid(f"--password-file: {e.message}") from e


def default_server_address(data: DataDir) -> str:
    """The first name in the server's TLS certificate, on the default port: how hosts reach it unless told."""
    cert = x509.load_pem_x509_certificate(data.tls_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    first = next(str(n.value) for n in names)
    return str(ServerAddress(first, wire.DEFAULT_PORT))


class BundleChooser:
    """The newest published bundle for an OS tag, checked against its published hash once per push."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        self.repo = Repository(data)
        self.chosen: dict[str, Bundle] = {}

    def __call__(self, os_tag: str) -> Bundle:
        if os_tag not in self.chosen:
            entries = [e for e in self.repo.list() if e.os_tag == os_tag]
            if not entries:
                raise PushNoBundle(f"the repository holds no bundle for {os_tag}")
            newest = max(entries, key=lambda e: version_key(e.version))
            path = self.data.repository_dir / newest.name
            if sha256_file(path) != newest.sha256:
                raise PushNoBundle(f"{path} does not match its published hash; run `mobility-server repo rescan`")
            self.chosen[os_tag] = Bundle(newest.name, path, newest.sha256)
        return self.chosen[os_tag]


def push(
    data: DataDir,
    targets: Sequence[ServerAddress],
    credentials: Credentials,
    *,
    server: str,
    accept_new_host_keys: bool,
    parallel: int,
    timeout: float,
    progress: Progress,
    database: Database,
) -> list[HostResult]:
    settings = PushSettings(
        server=server,
        fingerprint=pki.fingerprint(x509.load_pem_x509_certificate(data.ca_cert.read_bytes())),
        credentials=credentials,
        known_hosts=KnownHosts(data.known_hosts),
        accept_new_host_keys=accept_new_host_keys,
        bundle_for=BundleChooser(data),
        log_dir=data.push_logs,
        timeout=timeout,
    )
    storage = Storage.open(database, pool_size=0)
    try:
        close_interrupted(storage, time.time())
        return asyncio.run(_push_all(storage, targets, settings, parallel, progress))
    finally:
        progress.close()
        storage.close()


async def _push_all(
    storage: Storage, targets: Sequence[ServerAddress], s: PushSettings, parallel: int, progress: Progress
) -> list[HostResult]:
    gate = asyncio.Semaphore(parallel)
    results = [HostResult(str(t), str(uuid.uuid4())) for t in targets]
    for r in results:
        _record(storage, r)
        progress.step(r, "queued")

    async def one(target: ServerAddress, result: HostResult) -> HostResult:
        async with gate:
            # Database calls in a thread: the other hosts' SSH sessions run on this loop meanwhile.
            token_id, token = await asyncio.to_thread(create_token, storage, TOKEN_TTL, 1, time.time())
            # Only this host may report on the job.
            await asyncio.to_thread(storage.set_job_owner, result.job_id, f"token:{token_id}")
            try:
                await push_host(target, result, token, s, progress.step)
            finally:
                await asyncio.to_thread(storage.remove_token, token_id)
            # The host's own word about its ID is not proof: the ID is the one its job was reported under, over
            # mutual TLS, by the host that enrolled with (or proved) this push's token.
            job = await asyncio.to_thread(storage.job, result.job_id)
            result.host_id = job.host_id if result.ok and job is not None else None
            await asyncio.to_thread(_record, storage, result)
            return result

    return list(await asyncio.gather(*(one(t, r) for t, r in zip(targets, results, strict=True))))


def close_interrupted(storage: Storage, now: float) -> list[str]:
    """Push jobs still `running` long after any push could have ended were left by a push that was killed: they
    end `failed` (PUSH-INTERRUPTED), so that no job stays running for ever. Their IDs."""
    closed = []
    for job in storage.jobs():
        if job.kind == "push" and job.state == "running" and job.updated_at < now - STALE_AFTER:
            error = PushInterrupted("the push stopped before this host's result was known")
            storage.record_job(
                job_id=job.job_id,
                host_id=job.host_id,
                hostname=job.hostname,
                kind=job.kind,
                state="failed",
                error_id=error.id,
                remediation=error.fix,
                detail=error.message,
                now=now,
            )
            closed.append(job.job_id)
    return closed


def _record(storage: Storage, r: HostResult) -> None:
    storage.record_job(
        job_id=r.job_id,
        host_id=r.host_id,
        hostname=r.target,
        kind="push",
        state=r.state,
        error_id=r.error.id if r.error else None,
        remediation=r.error.fix if r.error else None,
        detail=r.message[:2000] or None,
        now=time.time(),
    )
