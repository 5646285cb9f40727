"""One host's push: connect → authenticate → root? → SFTP → OS tag → free space → copy the bundle → bootstrap
with a one-time token → collect the result and the install log. Every failure becomes a MobilityError with a
stable ID; passwords and tokens never appear in a command line or a log."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from agent.lifecycle.prereq import DEFAULT_INSTALL_DIR
from agent.shared.address import ServerAddress
from agent.shared.errors import FreezeNotReady, MobilityError
from agent.shared.fsutil import atomic_write
from server.errors import (
    PushAuthFailed,
    PushConnectRefused,
    PushConnectTimeout,
    PushHostKeyMismatch,
    PushHostKeyUnknown,
    PushInstallFailed,
    PushNameUnresolved,
    PushNoSftp,
    PushNotRoot,
    PushSshFailed,
    PushUnreachable,
)
from server.push.inspect import check_free_space, detect_remote_os
from server.push.known_hosts import KnownHosts, fingerprint

T = TypeVar("T")
WORK_DIR = "/var/lib/mobility-push"  # root-owned, not world-writable like /tmp
INSTALL_LOG = "/var/log/mobility/install.log"
LOG_TAIL_LINES = 20
STALE_AFTER = 2 * 3600  # seconds: longer than any push (its install times out) and its token's life


@dataclass(frozen=True)
class Credentials:
    user: str
    key: asyncssh.SSHKey | None = None
    password: str | None = field(default=None, repr=False)  # read from a file; never printed


@dataclass(frozen=True)
class Bundle:
    name: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class PushSettings:
    server: str  # the configuration server as the hosts reach it
    fingerprint: str  # of the server's CA, pinned by the host's bootstrap
    credentials: Credentials
    known_hosts: KnownHosts
    accept_new_host_keys: bool
    bundle_for: Callable[[str], Bundle]  # OS tag -> the newest published bundle (PUSH-NO-BUNDLE if none)
    log_dir: Path  # where each host's install log is kept
    timeout: float = 15.0  # connect and log in
    install_timeout: float = 900.0


@dataclass
class HostResult:
    target: str
    job_id: str
    state: str = "running"  # then "succeeded", "succeeded with warnings" or "failed"
    os_tag: str | None = None
    host_id: str | None = None
    message: str = ""
    error: MobilityError | None = None
    log_tail: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state in ("succeeded", "succeeded with warnings")

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.target,
            "job_id": self.job_id,
            "state": self.state,
            "os_tag": self.os_tag,
            "host_id": self.host_id,
            "message": self.message,
            "error": self.error.to_json() if self.error else None,
            "log_tail": self.log_tail,
            "seconds": round(self.seconds, 2),
        }


Step = Callable[[HostResult, str], None]


def connect_error(e: BaseException, target: ServerAddress) -> MobilityError:
    """The stable error for a failure to reach or log in to a host (pure)."""
    if isinstance(e, MobilityError):
        return e
    if isinstance(e, socket.gaierror):
        return PushNameUnresolved(f"the name {target.host} does not resolve ({e.strerror})")
    if isinstance(e, ConnectionRefusedError):
        return PushConnectRefused("connection refused")
    if isinstance(e, TimeoutError | asyncssh.TimeoutError):  # asyncio.TimeoutError is TimeoutError
        return PushConnectTimeout("no SSH answer (or no login) within the timeout")
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return PushHostKeyMismatch(f"the host key does not match the one recorded ({e.reason})")
    if isinstance(e, asyncssh.PermissionDenied):
        return PushAuthFailed(f"the host refused the credentials ({e.reason})")
    if isinstance(e, asyncssh.Error):
        return PushSshFailed(str(e.reason))
    if isinstance(e, OSError):
        return PushUnreachable(str(e.strerror or e))
    return PushSshFailed(str(e))


async def _guarded(target: ServerAddress, timeout: float, work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, timeout)
    except (OSError, asyncssh.Error, TimeoutError) as e:
        raise connect_error(e, target) from e


async def host_keys(target: ServerAddress, s: PushSettings) -> asyncssh.SSHKnownHosts:
    """What to check the host's key against: the known_hosts file when it knows the host, else (trust on first use,
    when allowed) the key presented now, recorded first. A key the file marks @revoked is never accepted."""
    if s.known_hosts.knows(target):
        return s.known_hosts.load()
    key = await _guarded(target, s.timeout, asyncssh.get_server_host_key(target.host, target.port, config=None))
    if key is None:
        raise PushSshFailed("the host presented no host key")
    if key in s.known_hosts.revoked(target):
        raise PushHostKeyMismatch(f"its host key {fingerprint(key)} is marked @revoked in {s.known_hosts.path}")
    if not s.accept_new_host_keys:
        raise PushHostKeyUnknown(
            f"its host key {fingerprint(key)} is not in {s.known_hosts.path}; nothing was sent to it"
        )
    s.known_hosts.record(target, key)
    return s.known_hosts.load()


async def connect(target: ServerAddress, s: PushSettings) -> asyncssh.SSHClientConnection:
    known = await host_keys(target, s)
    c = s.credentials
    try:
        return await _guarded(
            target,
            s.timeout,
            asyncssh.connect(
                target.host,
                target.port,
                username=c.user,
                known_hosts=known,
                client_keys=[c.key] if c.key else None,
                password=c.password,
                agent_path=None,
                config=None,
                preferred_auth="publickey" if c.key else "password,keyboard-interactive",
            ),
        )
    except PushHostKeyMismatch as e:
        try:  # name the key presented, to compare on the host
            shown = await _guarded(
                target, s.timeout, asyncssh.get_server_host_key(target.host, target.port, config=None)
            )
            if shown is not None:
                e.message += f"; it presented {fingerprint(shown)}"
        except MobilityError:
            pass
        raise


async def _run(conn: asyncssh.SSHClientConnection, command: str, timeout: float) -> asyncssh.SSHCompletedProcess:
    try:
        return await asyncio.wait_for(conn.run(command, check=False), timeout)
    except TimeoutError as e:
        raise PushInstallFailed(f"`{command.split(maxsplit=1)[0]}` did not finish within {timeout:.0f} s") from e


async def push_host(target: ServerAddress, result: HostResult, token: str, s: PushSettings, step: Step) -> HostResult:
    """Push to one host; ``result`` says how it ended (a MobilityError becomes its error, never raised)."""
    result.started = time.monotonic()
    try:
        step(result, "connecting")
        async with await connect(target, s) as conn:
            await _push(conn, target, token, s, step, result)
    except MobilityError as e:
        result.state, result.error, result.message = "failed", e, e.message
    except (OSError, asyncssh.Error) as e:  # the session broke off after logging in
        error = connect_error(e, target)
        result.state, result.error, result.message = "failed", error, error.message
    result.seconds = time.monotonic() - result.started
    step(result, result.state)
    return result


async def _push(
    conn: asyncssh.SSHClientConnection, target: ServerAddress, token: str, s: PushSettings, step: Step, r: HostResult
) -> None:
    step(r, "checking root")
    who = await _run(conn, "id -u", s.timeout)
    uid = str(who.stdout or "").strip()
    if who.exit_status != 0 or uid != "0":
        raise PushNotRoot(f"logged in as {s.credentials.user} (uid {uid or '?'}), not root")
    step(r, "opening SFTP")
    try:
        sftp = await asyncio.wait_for(conn.start_sftp_client(), s.timeout)
    except (asyncssh.Error, OSError, TimeoutError) as e:
        raise PushNoSftp(f"the SFTP subsystem is not available ({getattr(e, 'reason', e)})") from e
    async with sftp:
        step(r, "detecting the OS")
        r.os_tag = (await detect_remote_os(sftp)).os_tag
        bundle = s.bundle_for(r.os_tag)
        step(r, "checking free space")
        await check_free_space(sftp, ("/var/lib", DEFAULT_INSTALL_DIR))
        work = f"{WORK_DIR}/{r.job_id}"
        try:
            await _copy_and_install(conn, sftp, work, bundle, token, s, step, r)
        finally:
            await _run(conn, f"rm -rf {shlex.quote(work)}", s.timeout)  # the token goes with it


async def _copy_and_install(
    conn: asyncssh.SSHClientConnection,
    sftp: asyncssh.SFTPClient,
    work: str,
    bundle: Bundle,
    token: str,
    s: PushSettings,
    step: Step,
    r: HostResult,
) -> None:
    private = asyncssh.SFTPAttrs(permissions=0o700)
    for d in (WORK_DIR, work):
        if not await sftp.isdir(d):
            await sftp.mkdir(d, private)
    # What a push killed half-way left behind (a used or expired token with it), once it is surely over.
    stale = STALE_AFTER // 60
    await _run(conn, f"find {WORK_DIR} -mindepth 1 -maxdepth 1 -mmin +{stale} -exec rm -rf {{}} +", s.timeout)
    step(r, f"copying {bundle.name}")
    await sftp.put(bundle.path, f"{work}/bundle.tar.gz")
    summed = await _run(conn, f"sha256sum {shlex.quote(work)}/bundle.tar.gz", s.timeout)
    if str(summed.stdout or "").split(" ", 1)[0] != bundle.sha256:
        raise PushInstallFailed(f"the copy of {bundle.name} arrived damaged (sha256 mismatch)")
    async with sftp.open(f"{work}/token", "w", asyncssh.SFTPAttrs(permissions=0o600)) as f:
        await f.write(token + "\n")
    step(r, "installing and registering")
    q = shlex.quote
    command = (
        f"cd {q(work)} && mkdir -p bundle && tar -xzf bundle.tar.gz -C bundle && "
        f"./bundle/bootstrap --json -i {q(s.server)} --cs-fingerprint {q(s.fingerprint)} "
        f"-P {q(work + '/token')} --job-id {q(r.job_id)} --retry-for 30"
    )
    done = await _run(conn, command, s.install_timeout)
    log = await _collect_log(sftp, s.log_dir / f"{r.job_id}.log")
    outcome = _parse_outcome(str(done.stdout or ""))
    if done.exit_status == 0 and outcome.get("state") in ("succeeded", "succeeded with warnings", "current"):
        r.host_id = outcome.get("host_id")
        r.state = "succeeded with warnings" if outcome["state"] == "succeeded with warnings" else "succeeded"
        r.message = str(outcome.get("message", ""))
        if r.state == "succeeded with warnings":
            r.error = FreezeNotReady(r.message)
        return
    r.log_tail = log[-LOG_TAIL_LINES:]
    error = outcome.get("error") if isinstance(outcome.get("error"), dict) else None
    cause = (
        f"{error.get('code')}: {error.get('message')}"
        if error
        else (str(done.stderr or "").strip().splitlines() or [f"exit status {done.exit_status}"])[-1]
    )
    tail = "\n".join(f"    {line}" for line in r.log_tail)
    raise PushInstallFailed(
        f"the install failed ({cause}); the end of its install.log:\n{tail}"
        if tail
        else f"the install failed ({cause}); the host wrote no install.log"
    )


def _parse_outcome(stdout: str) -> dict[str, Any]:
    """The bootstrap's --json document, or {} when it printed none (it died before, or is not Mobility's)."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _collect_log(sftp: asyncssh.SFTPClient, keep: Path) -> list[str]:
    """The host's install.log, kept in the server's data directory; its lines."""
    try:
        async with sftp.open(INSTALL_LOG, "rb", encoding=None) as f:
            read = await f.read()
        data = read if isinstance(read, bytes) else read.encode()
    except asyncssh.SFTPError:
        return []
    keep.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(keep, data, 0o640)
    return data.decode(errors="replace").splitlines()
