"""The bootstrapper's lifecycle, run at every boot from a template: detect the OS, and unless everything is
already installed, registered, current and this machine's, contact the server (pinned CA, capped exponential
backoff within a bounded time, else exit 75), fetch and verify the bundle (TUF), check prerequisites, install,
register, start the daemon, and report the job to the server (`succeeded`, `succeeded with warnings`, `failed`)."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent import __version__
from agent.errors import (
    InstallDirInvalid,
    RemoteBusy,
    ServerUnreachable,
    TufNoBundle,
)
from agent.faults import fault_point
from agent.host.distros import detect_os, require_supported
from agent.host.paths import Paths
from agent.lifecycle.backoff import with_backoff
from agent.lifecycle.bootstrap_conf import BootstrapSettings, passphrase_path
from agent.lifecycle.bundle_dir import unpack
from agent.lifecycle.bundles import version_key
from agent.lifecycle.failover import detect as detect_failover
from agent.lifecycle.failover import load_failover, speaks_as_source
from agent.lifecycle.identity import collect_facts, load_registration, machine_hostname
from agent.lifecycle.install import install, install_lock, log
from agent.lifecycle.install_dir import parse_install_dir
from agent.lifecycle.installed import InstallRecord, load_install_record
from agent.lifecycle.lastjob import load_last_job, save_last_job
from agent.lifecycle.services import start_daemon
from agent.shared.errors import FreezeNotReady, IoFailed, MobilityError
from agent.shared.fsutil import atomic_write, remove
from agent.shared.wire import JobReport
from agent.update.state import declined, load_record, load_target, unfinished, updater_running


@dataclass(frozen=True)
class Outcome:
    state: str  # "current", "succeeded", "succeeded with warnings"
    message: str
    host_id: str | None = None
    job_id: str | None = None


class Progress:
    """One line per step: on the terminal when there is one, always in install.log."""

    def __init__(self, paths: Paths, total: int) -> None:
        self.paths, self.total, self.n = paths, total, 0
        self.tty = sys.stderr.isatty()

    def step(self, title: str) -> None:
        self.n += 1
        fault_point("bootstrap.step", step=self.n, title=title)  # the crash tests kill the process here
        log(self.paths, f"bootstrap [{self.n}/{self.total}] {title}")
        if self.tty:
            print(f"[{self.n}/{self.total}] {title}", file=sys.stderr, flush=True)


def is_current(paths: Paths) -> bool:
    """Installed, registered, the identity is this machine's, the last bootstrap ran to its end (a run killed before
    it started the daemon and reported its job is not), and at the right version: the one the server last named for
    this machine (target.json, no network needed), or without one this bootstrapper's version or newer. An upgrade
    left unfinished with no watcher running is not current either (the watcher is started again)."""
    installed = _installed_here(paths)
    return installed is not None and not _upgrade_due(paths, installed)


def _installed_here(paths: Paths) -> InstallRecord | None:
    """The install record when the agent is installed, registered as this machine, and its last bootstrap ended."""
    installed, last_job = load_install_record(paths), load_last_job(paths)
    if installed is None or last_job is None or not last_job.ended_well or not isinstance(installed.install_dir, str):
        return None
    try:
        current = paths.install_dir(parse_install_dir(installed.install_dir, "agent.json")) / "current"
    except InstallDirInvalid:
        return None
    reg = load_registration(paths)
    if (
        (current / ".complete").exists()
        and reg is not None
        and paths.client_cert.exists()
        and reg.facts == collect_facts(paths)
        and not speaks_as_source(load_failover(paths), reg.host_id)  # a failover still holding the source's
    ):
        return installed
    return None


def _upgrade_due(paths: Paths, installed: InstallRecord) -> bool:
    """Whether the installed version is not the one to run: the server names a newer one this machine has not
    declined, an upgrade is unfinished without its watcher, or (no target known) this bootstrapper is newer."""
    record = load_record(paths)
    if unfinished(record):
        return not updater_running(paths)
    target = load_target(paths)
    running = version_key(installed.version or "0")
    if target is None:
        return running < version_key(__version__)
    return target.job_id is not None and version_key(target.version) > running and not declined(record, target)


def bootstrap(paths: Paths, settings: BootstrapSettings, sleep: Callable[[float], None] = time.sleep) -> Outcome:
    os_info = require_supported(detect_os(paths))
    failover = detect_failover(paths, time.time())
    if failover is not None and failover.test:
        # A test leaves the server as it was: no install, no registration, no job (the source's record is not ours).
        return Outcome(
            "test failover",
            f"this machine is {failover.describe()}: nothing is installed, registered or reported",
            None,
        )
    if is_current(paths) and settings.job_id is None:
        return Outcome(
            "current",
            "installed, registered, current and this machine's: nothing to do",
            (reg.host_id if (reg := load_registration(paths)) else None),
        )
    installed = _installed_here(paths)
    if installed is not None and settings.job_id is None and load_target(paths) is not None:
        return _upgrade_at_boot(paths, installed)
    # Imported past the at-boot no-op, which needs neither (TLS, HTTP, the server API: ~30 ms of imports).
    from agent.lifecycle.api_client import parse_fingerprint
    from agent.shared.address import parse_address
    from agent.shared.secretfile import read_secret_file

    parse_address(settings.server)
    pinned = parse_fingerprint(settings.fingerprint) if settings.fingerprint else None
    secret = read_secret_file(passphrase_path(paths, settings.passphrase_file))
    job = JobReport(
        kind=_job_kind(paths),
        state="running",
        hostname=machine_hostname(paths),
        job_id=settings.job_id or str(uuid.uuid4()),
    )
    if is_current(paths):  # a push to a machine that has everything: its job still ends, under its own identity
        reg = load_registration(paths)
        message = "installed, registered, current and this machine's: nothing to do"
        job = replace(job, state="succeeded", host_id=reg.host_id if reg else None, detail=message)
        _report(paths, job, settings, secret, pinned)
        return Outcome("current", message, job.host_id, job.job_id)
    try:
        try:
            with install_lock(paths):
                return _run(paths, settings, os_info.os_tag, pinned, secret, job, sleep)
        except OSError as e:  # a disk or file problem below: the job still ends `failed`, with an ID
            raise IoFailed.from_os_error(e) from e
    except MobilityError as e:
        _report(
            paths,
            replace(job, state="failed", error_id=e.id, remediation=e.fix, detail=e.message[:2000]),
            settings,
            secret,
            pinned,
        )
        raise


def _run(
    paths: Paths,
    s: BootstrapSettings,
    os_tag: str,
    pinned: str | None,
    secret: str,
    job: JobReport,
    sleep: Callable[[float], None],
) -> Outcome:
    from agent.lifecycle.api_client import Client
    from agent.lifecycle.fetch import fetch_bundle
    from agent.lifecycle.registration import configure, trusted_ca
    from agent.shared.address import parse_address

    progress = Progress(paths, 6)
    server = parse_address(s.server)
    progress.step(f"contact {server} (CA pinned {'by fingerprint' if pinned else 'on first use'})")
    ca, _ = with_backoff("contacting the server", lambda: trusted_ca(paths, server, pinned), s.retry_for, sleep)
    client = Client(server, ca)
    try:
        root_json = paths.tuf_dir / "root.json"
        if not root_json.exists():  # trust in the repository chains from the pinned CA of this TLS connection
            status, body = with_backoff(
                "fetching the repository root",
                lambda: client.raw("GET", "/v1/repo/metadata/1.root.json"),
                s.retry_for,
                sleep,
            )
            if status != 200:
                raise ServerUnreachable(f"{server}: the repository root metadata answered HTTP {status}")
            atomic_write(root_json, body)
        if s.bundle is None:
            progress.step(f"fetch and verify the {os_tag} bundle")
            downloads = paths.downloads_dir

            def fetch() -> Path:
                # The template's own version when the repository has it: a version published but not rolled out
                # yet never reaches a fresh clone first (the server moves machines on, in waves). Else the newest.
                fetch_one = functools.partial(
                    fetch_bundle, f"https://{server}", client.context, root_json.read_bytes(), paths.tuf_metadata_dir
                )
                try:
                    return fetch_one(os_tag, downloads, version=__version__)
                except TufNoBundle:
                    return fetch_one(os_tag, downloads)

            bundle = with_backoff("downloading the bundle", fetch, s.retry_for, sleep)
    finally:
        client.close()
    if s.bundle is None:
        progress.step("unpack")
        staging = unpack(paths, bundle)
    else:  # copied by the server (push install); its files are checked against bundle.json by install()
        progress.step(f"take the bundle the server copied to {s.bundle}")
        progress.step("unpack: already unpacked")
        staging = Path(s.bundle)
    progress.step("check prerequisites and install")
    installed = install(paths, staging, s.install_dir, s.role, s.platform)
    if s.bundle is None:  # the staging copy is ours; a copied bundle is its caller's to remove
        with contextlib.suppress(OSError):
            remove(staging)
    progress.step("register")
    failover = load_failover(paths)
    enrolled = configure(
        paths,
        s.server,
        secret,
        pinned,
        s.role,
        s.platform,
        os_tag,
        retry_for=s.retry_for,
        sleep=sleep,
        failover=failover if failover is not None and not failover.test else None,
    )
    progress.step("start the daemon")
    started = start_daemon(paths, installed.init)
    log(paths, f"bootstrap: {started}")
    warnings = (
        []
        if installed.freeze.ready
        else [f"freeze provider not set up ({installed.freeze.reason}): only crash-consistent recovery points"]
    )
    state = "succeeded with warnings" if warnings else "succeeded"
    reg = enrolled.registration
    clone = f", a clone of {reg.cloned_from}" if reg.cloned_from else ""
    if reg.failover_of is not None and failover is not None:
        clone = f", a failover of {reg.failover_of} at point {failover.point_id}"
    message = f"Mobility {installed.version} installed and registered as {enrolled.registration.host_id}{clone}"
    job = replace(
        job,
        state=state,
        host_id=enrolled.registration.host_id,
        error_id=FreezeNotReady.code if warnings else None,
        remediation=FreezeNotReady.remediation if warnings else None,
        detail="; ".join([message, *warnings]),
    )
    _report(paths, job, s, secret, pinned)
    return Outcome(state, "; ".join([message, *warnings]), enrolled.registration.host_id, job.job_id)


def _upgrade_at_boot(paths: Paths, installed: InstallRecord) -> Outcome:
    """The agent is installed and registered, but the server named a newer version (or an upgrade was left
    unfinished): the upgrade goes through the same watcher and health gate as the daemon's. On this machine the
    watcher is started (as the installed version's program); under --root, where nothing is started on the host,
    the new version is fetched and placed beside the installed one, and the watcher switches to it when the
    daemon of that root starts."""
    from agent.lifecycle.services import init_of, start_updater, updater_argv

    reg = load_registration(paths)
    host_id = reg.host_id if reg else None
    record = load_record(paths)
    target = load_target(paths)
    wanted = record.to_version if unfinished(record) and record else (target.version if target else "?")
    if paths.root == paths.root.parent:
        version = record.from_version if unfinished(record) and record else (installed.version or "")
        started = start_updater(paths, init_of(installed.os_tag), version, updater_argv(paths, version))
        log(paths, f"bootstrap: upgrade to {wanted}: {started}")
        return Outcome("upgrading", f"mobility {wanted} is due: {started}", host_id)
    from agent.update.state import Phase, update_lock
    from agent.update.watcher import Updater

    with update_lock(paths):
        result = Updater(paths, time.sleep).run(stop_before=Phase.SWITCHING)
    log(paths, f"bootstrap: upgrade to {wanted}: {result.state}: {result.message}")
    if result.state in ("failed", "postponed"):
        return Outcome("upgrading", f"mobility {wanted}: {result.state}: {result.message}", host_id)
    return Outcome(
        "upgrading",
        f"mobility {wanted} placed beside {installed.version}: its watcher switches to it when the agent starts",
        host_id,
    )


def _report(paths: Paths, job: JobReport, s: BootstrapSettings, secret: str, pinned: str | None) -> None:
    """Tell the server (mutual TLS once registered, else a proof of the secret) and keep a local copy."""
    from agent.lifecycle.registration import report_job

    with contextlib.suppress(OSError):
        save_last_job(paths, job, time.time())
    try:
        # A boot storm's 503s are waited out (with jitter) for a while; an unreachable server is not (the run that
        # failed to reach it has waited already); the local copy stays either way.
        with_backoff(
            "reporting the job",
            lambda: report_job(paths, job.to_json(), s.server, secret, pinned),
            60.0,
            retried=(RemoteBusy,),
        )
    except MobilityError as e:
        log(paths, f"could not report job {job.job_id} to the server: {e.id}: {e.message}")


def _job_kind(paths: Paths) -> str:
    installed = load_install_record(paths)
    if installed is None:
        return "install"
    return "upgrade" if version_key(installed.version or "0") < version_key(__version__) else "configure"


__all__ = ["BootstrapSettings", "Outcome", "bootstrap", "is_current", "with_backoff"]
