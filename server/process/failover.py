"""Failover from a recovery point: materialise its disk images from the chunk store (every chunk's hash checked,
the root hash recomputed) in the format a hypervisor boots (raw, qcow2, VMDK, fixed-size VHD, converted with
qemu-img), mark them as a failover of the source (a file in the machine's root filesystem, written inside the
appliance: server/process/appliance.py), and verify a point without writing anything. A test failover of a point
is server/process/testfailover.py."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.faults import fault_point
from agent.replication.chunks import RootHasher, zero_hash
from agent.shared.errors import IoFailed
from agent.shared.failover_mark import MARK_FILE, FailoverMark
from agent.shared.fsutil import fsync_dir
from agent.shared.replication_wire import HASH_SIZE
from server.errors import FailoverOutExists, PointCorrupt
from server.process.commands import run_tool
from server.process.interrupts import signals_held
from server.process.store import ChunkStore, Point, PointDisk
from server.progress import Progress, Quiet

_WINDOW = 64  # chunks read ahead by the pool


# An image being written (or converted): hidden, and never taken for a disk image.
_PARTIAL = re.compile(r"\..+\.(?:img|qcow2|vmdk|vhd)\.partial")

# --format: the image's extension and how qemu-img writes it. VHD is fixed-size (what cloud imports take), its
# virtual size exactly the disk's (force_size: not rounded to a CHS geometry).
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "raw": ("img", ()),
    "qcow2": ("qcow2", ("-O", "qcow2")),
    "vmdk": ("vmdk", ("-O", "vmdk")),
    "vhd": ("vhd", ("-O", "vpc", "-o", "subformat=fixed,force_size=on")),
}


def image_names(disks: Sequence[str]) -> dict[str, str]:
    """The file each disk's image gets: /dev/sdb -> sdb.img, /dev/disk/by-id/x -> disk_by-id_x.img. Disks whose names
    would give one file (/dev/a_b and /dev/a/b) each get a hash of their own name in it too, so that every disk of a
    point has its image (pure)."""
    plain = {d: d.removeprefix("/dev/").replace("/", "_") for d in disks}
    shared = {name for name in plain.values() if list(plain.values()).count(name) > 1}
    names = {d: (f"{n}-{hashlib.sha256(d.encode()).hexdigest()[:12]}" if n in shared else n) for d, n in plain.items()}
    if len(set(names.values())) < len(names):  # a name chosen to meet another's hash: number them all
        names = {d: f"{i:02d}-{n}" for i, (d, n) in enumerate(names.items())}
    return {d: n + ".img" for d, n in names.items()}


def _chunks(store: ChunkStore, disk: PointDisk, manifest: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(index, data) of every chunk in order, None for zero chunks; read and verified two at a time."""
    g = disk.geometry

    def load(i: int) -> bytes | None:
        digest = manifest[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        if digest == zero_hash(g.length(i)):
            return None
        try:
            return store.read(digest, g.length(i))
        except PointCorrupt as e:
            raise PointCorrupt(f"{disk.disk}, chunk {i} (offset {g.offset(i)}): {e.message}") from e

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for i in range(g.count):
            pending.append((i, pool.submit(load, i)))
            if len(pending) >= _WINDOW:
                j, fut = pending.pop(0)
                yield j, fut.result()
        for j, fut in pending:
            yield j, fut.result()


def _check_root(disk: PointDisk, manifest: bytes) -> None:
    root = RootHasher(disk.geometry)
    root.update(manifest)
    if root.hexdigest() != disk.root:
        raise PointCorrupt(f"{disk.disk}: the manifest's root hash is not the point's")


def verify_point(store: ChunkStore, point: Point, progress: Progress | None = None) -> dict[str, Any]:
    """Recompute each disk's root hash from the store: every chunk read and hashed (PointCorrupt on the first
    that does not match, naming the disk and chunk)."""
    progress = progress or Quiet()
    disks = []
    for disk in point.disks:
        manifest = store.manifest(disk)
        _check_root(disk, manifest)
        progress.task(f"verifying {disk.disk}", disk.size)
        stored = 0
        for i, data in _chunks(store, disk, manifest):
            stored += data is not None
            progress.advance(disk.geometry.length(i))
        disks.append({"disk": disk.disk, "root": disk.root, "chunks": disk.geometry.count, "stored_chunks": stored})
    return {"point_id": point.point_id, "ok": True, "disks": disks}


def materialise(
    store: ChunkStore,
    point: Point,
    out: Path,
    progress: Progress | None = None,
    *,
    fmt: str = "raw",
    finish: Callable[[list[Path]], None] | None = None,
) -> list[Path]:
    """Write the point's disk images into ``out`` (new or empty): raw and sparse where the disk was zero, then
    ``finish`` (given the raw images: the failover's mark is written there), then converted to ``fmt``. Each is
    written under a hidden temporary name and fsynced; only when every one is whole and verified do they get their
    names, so an image that looks usable is one. On any error (a corrupt chunk, a full disk, a failed conversion, a
    signal) nothing is left. ``progress`` hears each disk and the bytes of it written (a terminal's bar:
    server/progress.py)."""
    progress = progress or Quiet()
    extension, convert = FORMATS[fmt]
    out.mkdir(parents=True, exist_ok=True)
    with _writing_into(out):
        names = image_names([d.disk for d in point.disks])
        raw: list[Path] = []
        written: list[tuple[Path, Path]] = []
        try:
            for disk in point.disks:
                manifest = store.manifest(disk)
                _check_root(disk, manifest)
                final = out / (names[disk.disk].removesuffix(".img") + "." + extension)
                partial = out / f".{names[disk.disk]}.partial"
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                raw.append(partial)
                written.append((partial, final))
                try:
                    os.ftruncate(fd, disk.size)
                    progress.task(f"{disk.disk} -> {final.name}", disk.size)
                    for i, data in _chunks(store, disk, manifest):
                        if data is not None:
                            os.pwrite(fd, data, disk.geometry.offset(i))
                        progress.advance(disk.geometry.length(i))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fault_point("failover.step", step="written", disk=disk.disk)
            if finish is not None:
                finish(list(raw))
            if convert:
                for n, (partial, final) in enumerate(written):
                    converted = final.with_name(f".{final.name}.partial")
                    written[n] = (converted, final)  # from here on, the converted one is what a failure removes
                    _convert(partial, converted, convert, progress)
            for partial, final in written:
                os.rename(partial, final)
            fsync_dir(out)
        except BaseException:
            with signals_held():
                for partial in raw:
                    partial.unlink(missing_ok=True)
                for partial, final in written:
                    partial.unlink(missing_ok=True)
                    final.unlink(missing_ok=True)
            raise
    return [final for _, final in written]


def _convert(raw: Path, partial: Path, options: tuple[str, ...], progress: Progress) -> None:
    """``raw`` converted by qemu-img to ``partial``, fsynced; the raw one removed."""
    size = raw.stat().st_size
    final = partial.name.removeprefix(".").removesuffix(".partial")
    progress.task(f"converting {final}", size)
    # Bounded in time like every tool the server runs: generous for a slow disk (10 min, plus 10 MiB/s).
    r = run_tool(["qemu-img", "convert", "-q", "-f", "raw", *options, str(raw), str(partial)], 600 + size / (10 << 20))
    if r.returncode != 0:
        partial.unlink(missing_ok=True)
        raise IoFailed(f"qemu-img could not write {final}: {_tail(r.stderr or r.stdout)}")
    fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    progress.advance(size)
    raw.unlink()
    fault_point("failover.step", step="converted", disk=final)


def _tail(text: str, size: int = 400) -> str:
    return re.sub(r"\s+", " ", text.strip())[-size:]


@contextlib.contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """``out`` to ourselves (a lock on it: two failovers never write into one directory), empty but for the hidden
    partial images a failover killed outright left (removed here)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise FailoverOutExists(f"another failover is writing into {out}") from e
        for entry in os.scandir(out):
            if _PARTIAL.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        if any(out.iterdir()):
            raise FailoverOutExists(f"{out} is not empty")
        yield
    finally:
        os.close(fd)  # the lock goes with it


def mark_images(images: list[Path], mark: FailoverMark, scratch: Path, wait: float) -> dict[str, Any]:
    """Write ``mark`` into the machine's root filesystem on ``images`` (raw), inside the appliance: what the
    machine's agent reads at start to know it is a failover (agent/shared/failover_mark.py). What was done, or why
    not (no root filesystem among the disks: a point of data disks only)."""
    from server.process import scratch as areas
    from server.process.appliance import Appliance
    from server.process.inspection import find_root, write_files
    from server.process.recovery_vm import take_slot

    done: dict[str, Any] = {"file": MARK_FILE, "smbios": mark.smbios(), "marked": False}
    with areas.area(scratch, mark.point_id) as work:
        slot = take_slot(wait)
        try:
            with Appliance(images, work.path, writable=True) as appliance:
                appliance.launch()
                root, why = find_root(appliance)
                if root is None:
                    done["why"] = why
                else:
                    local = work.path / "failover.json"
                    local.write_text(mark.file_text())
                    write_files(appliance, root, {MARK_FILE: (local, 0o644)}, {})
                    done.update(marked=True, filesystem=root.device)
                appliance.close()
        finally:
            os.close(slot)
    return done
