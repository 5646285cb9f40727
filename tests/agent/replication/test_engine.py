"""agent/replication/engine.py, replication as the daemon runs it (``apply``, ``tick``, ``report``, ``stop``, point
requests), against the simulated process server (tests/agent/replication/simulator.py) and a simulated tracefs: what
the server asks for is started and stopped, a write the kernel reports reaches the replica, a dead disk thread or
tracer is started again and says so, a clean stop keeps the tracing for the next start and ends within its deadline,
and `mobility point` requests are answered.

The kernel is simulated at its two boundaries only, as in tests/agent/replication/test_replicator.py: the disk is an
image file whose size the block ioctls are answered for from the file, and the tracefs instance is a directory whose
``trace_pipe`` is a FIFO the test writes the kernel's ``block_rq_complete`` lines into (and which echoes what is
written to ``trace_marker``, as the kernel does); the tracer reading it is the real one. No root;
tests/integration/test_replication.py and test_replication_safety.py run the whole path on loop devices."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.faults import set_injector
from agent.host.paths import Paths
from agent.replication import devices, engine, tracing
from agent.replication.devices import BlockDevice
from agent.replication.engine import Replication
from agent.replication.state import leave_request, load_status, load_tracing_stop, take_answer
from agent.replication.tracing import EVENT, SECTOR, Tracer
from agent.shared.replication_wire import Policy, ProcessAddress, Protection
from tests.agent.replication.simulator import Faults, ProcessServerSimulator, disk_hashes, simulated, wait
from tests.faults import Injector

CHUNK = 65536
CHUNKS = 48
DISK = "/dev/sdb"
MAJOR, MINOR = 253, 77  # the image's device number, as the kernel's lines name it


class Tracefs:
    """The kernel's side of a tracefs instance: ``trace_pipe`` is a FIFO that ``complete`` writes the kernel's lines
    into, and a thread echoes each line written to ``trace_marker`` into it as a ``tracing_mark_write`` event. The
    FIFOs are held open here, so what is in the pipe outlives a reader, as the kernel's buffer outlives an agent."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "instances").mkdir(parents=True)
        self.pipe = -1
        self._fds: list[int] = []
        self._halt = threading.Event()
        self._echo: threading.Thread | None = None
        self._echoing = threading.Lock()
        self.dir: Path | None = None

    def create(self, tracer: Tracer) -> None:
        """Tracer._create as the kernel answers it: the instance, its event enabled, its trace_pipe opened."""
        d = tracer.dir
        self.remove(d)
        (d / "events" / EVENT).mkdir(parents=True)
        os.mkfifo(d / "trace_pipe")
        os.mkfifo(d / "trace_marker")
        (d / "buffer_size_kb").write_text(f"{tracer.buffer_kb}\n")
        (d / "events" / EVENT / "enable").write_text("1\n")
        (d / "tracing_on").write_text("1\n")
        tracer.fd = os.open(d / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        kept = os.open(d / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never read: no EPIPE
        self.pipe = os.open(d / "trace_pipe", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        marker = os.open(d / "trace_marker", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        held = os.open(d / "trace_marker", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never an end of file
        self._fds = [self.pipe, kept, marker, held]
        self._halt = threading.Event()
        self._echo = threading.Thread(target=self._echo_markers, args=(marker, self._halt), daemon=True)
        self._echo.start()
        self.dir = d

    def remove(self, path: Path, wait: float = 0.0) -> None:
        """tracing.remove_instance: the instance and what its buffer held are gone."""
        if self._echo is not None:
            self._halt.set()
            self._echo.join(5)
            self._echo = None
        for fd in self._fds:
            os.close(fd)
        self._fds, self.pipe, self.dir = [], -1, None
        shutil.rmtree(path, ignore_errors=True)

    def _echo_markers(self, fd: int, halt: threading.Event) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        rest = b""
        while not halt.is_set():
            if not poller.poll(50):
                continue
            with self._echoing:
                rest += os.read(fd, 4096)
                *lines, rest = rest.split(b"\n")
                for line in lines:
                    self.line(b"agent-1 [000] ..... 1.000000: tracing_mark_write: " + line)

    def settle(self) -> None:
        """Wait until every marker written so far is in the buffer (the kernel writes it before the write returns)."""
        poller = select.poll()
        poller.register(self._fds[2], select.POLLIN)
        while True:
            with self._echoing:
                if not poller.poll(0):
                    return
            time.sleep(0.005)

    def clear(self) -> bytes:
        """Empty the buffer (as writing to the instance's ``trace`` file does); what it held."""
        held = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._fds[1], 65536):
                held += chunk
        return held

    def line(self, text: bytes) -> None:
        os.write(self.pipe, b"  " + text + b"\n")

    def complete(self, offset: int, length: int) -> None:
        """The kernel completed a write of ``length`` bytes at ``offset`` on the disk."""
        self.line(
            f"kworker-9 [001] d.h1. 2.000000: block_rq_complete: {MAJOR},{MINOR} WS () "
            f"{offset // SECTOR} + {length // SECTOR} [0]".encode()
        )


@pytest.fixture
def tracefs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tracefs]:
    fs = Tracefs(tmp_path / "tracefs")
    monkeypatch.setattr(tracing, "tracing_root", lambda: fs.root)
    monkeypatch.setattr(Tracer, "_create", lambda tracer: fs.create(tracer))  # noqa: PLW0108 - a class attribute
    monkeypatch.setattr(tracing, "remove_instance", fs.remove)
    yield fs
    if fs.dir is not None:
        fs.remove(fs.dir)


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The disk: an image file, resolved for DISK (any other name is looked up as the product does)."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(CHUNKS * CHUNK))
    device_size, sector_size, resolve = devices.device_size, devices.sector_size, engine.resolve_disk

    def size(fd: int) -> int:
        st = os.fstat(fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else device_size(fd)

    def sector(fd: int) -> int:
        return 512 if stat.S_ISREG(os.fstat(fd).st_mode) else sector_size(fd)

    def resolve_disk(paths: Paths, name: str) -> BlockDevice:
        return BlockDevice(name, path, MAJOR, MINOR, "mobility-test-img") if name == DISK else resolve(paths, name)

    monkeypatch.setattr(devices, "device_size", size)
    monkeypatch.setattr(engine, "device_size", size)
    monkeypatch.setattr(devices, "sector_size", sector)
    monkeypatch.setattr(engine, "resolve_disk", resolve_disk)
    return path


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[ProcessServerSimulator]:
    with simulated(tmp_path) as s:
        yield s


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "root").mkdir()
    return Paths(tmp_path / "root")


@pytest.fixture
def replication(
    paths: Paths, sim: ProcessServerSimulator, tracefs: Tracefs, image: Path
) -> Iterator[Callable[[], Replication]]:
    made: list[Replication] = []

    def make() -> Replication:
        r = Replication(paths, lambda: sim.client_context, "127.0.0.1", trace_buffer_kb=64)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def injected(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """The suite's fault injector in this process: ``fail(point)`` makes that point raise while the file it returns
    exists."""
    plan: dict[str, str] = {}

    def fail(point: str) -> Path:
        plan[point] = str(tmp_path / f"fail-{point}")
        set_injector(Injector({"fail_while": plan}))
        return Path(plan[point])

    yield fail
    set_injector(None)


def protect(sim: ProcessServerSimulator, *disks: str, interval: float = 3600.0) -> Protection:
    return Protection(disks, False, Policy(interval_seconds=interval), ProcessAddress("127.0.0.1", sim.port))


def in_sync(rep: Replication, sim: ProcessServerSimulator, image: Path) -> bool:
    r = rep.replicators.get(DISK)
    return (
        r is not None
        and r.state == "CONTINUOUS"
        and not r.stream.window
        and not r.dirty.pending_bytes()
        and sim.replica_hashes() == disk_hashes(image)
    )


def write(image: Path, tracefs: Tracefs | None, chunks: list[int]) -> None:
    """Change ``chunks`` on the disk; the kernel reports each write's completion (unless it is not tracing)."""
    with image.open("r+b") as f:
        for i in chunks:
            f.seek(i * CHUNK + 4096)
            f.write(os.urandom(8192))
    if tracefs is not None:
        for i in chunks:
            tracefs.complete(i * CHUNK + 4096, 8192)


def shown(rep: Replication) -> dict[str, tuple[str, str | None]]:
    return {d.disk: (d.state, d.error) for d in rep.report().disks}


def test_a_protected_disk_is_synchronised_and_a_write_the_kernel_reports_reaches_the_replica(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, tracefs: Tracefs, image: Path, paths: Paths
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    rep.tick(time.time())
    status = load_status(paths)
    assert status is not None and [(d["disk"], d["state"]) for d in status["disks"]] == [(DISK, "CONTINUOUS")]
    write(image, tracefs, [3, 30])
    wait("the writes on the replica", lambda: in_sync(rep, sim, image))
    assert sim.chunks(connection=1)[-2:] == [3, 30] and sim.connections == 1
    assert shown(rep) == {DISK: ("CONTINUOUS", None)}


def test_a_disk_that_cannot_be_protected_is_shown_stalled_and_forgotten_once_not_asked_for(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, image: Path
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK, "/dev/nosuchdisk"))
    assert shown(rep)["/dev/nosuchdisk"] == ("STALLED", "REPL-DISK-NOT-FOUND")
    wait("the initial sync of the other disk", lambda: in_sync(rep, sim, image))  # one disk harms no other
    rep.apply(protect(sim, DISK))
    assert shown(rep) == {DISK: ("CONTINUOUS", None)}


def test_protection_ended_stops_the_disks_thread_removes_the_tracing_and_the_status_shows_no_disk(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, tracefs: Tracefs, image: Path, paths: Paths
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    thread, instance = rep.replicators[DISK], tracefs.dir
    rep.tick(time.time())
    rep.apply(None)
    assert not thread.is_alive() and rep.replicators == {} and rep.tracer is None
    assert instance is not None and not instance.exists()  # nothing of ours stays in the kernel
    assert load_tracing_stop(paths) is None
    rep.tick(time.time())
    status = load_status(paths)
    assert status is not None and status["disks"] == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected defect
def test_a_disk_thread_that_died_is_started_again_shows_repl_internal_and_resyncs(
    replication: Callable[[], Replication],
    sim: ProcessServerSimulator,
    tracefs: Tracefs,
    image: Path,
    injected: Callable[[str], Path],
) -> None:
    failing = injected("replication.thread")
    failing.touch()  # the disk's thread dies as it starts
    rep = replication()
    rep.apply(protect(sim, DISK))
    dead = rep.replicators[DISK]
    wait("the thread's death", lambda: not dead.is_alive())
    failing.unlink()
    sim.faults = Faults(ack_delay=0.5)  # the sync is shown for half a second at least
    rep.tick(time.time())
    again = rep.replicators[DISK]
    assert again is not dead and again.is_alive()
    assert shown(rep)[DISK] == ("INITIAL_SYNC", "REPL-INTERNAL")  # a defect, made visible
    wait("the sync", lambda: in_sync(rep, sim, image))
    assert shown(rep)[DISK] == ("CONTINUOUS", None)
    sim.faults = Faults()
    write(image, tracefs, [9])  # and the new thread is traced
    wait("the write on the replica", lambda: in_sync(rep, sim, image))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected defect
def test_a_tracer_that_died_is_started_again_and_every_disk_resyncs(
    replication: Callable[[], Replication],
    sim: ProcessServerSimulator,
    tracefs: Tracefs,
    image: Path,
    injected: Callable[[str], Path],
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    failing = injected("replication.trace")
    failing.touch()
    dead = rep.tracer
    assert dead is not None
    wait("the tracer's death", lambda: not dead.is_alive())
    failing.unlink()
    write(image, None, [12])  # a write nobody saw
    sim.faults = Faults(ack_delay=0.5)  # the resync is shown for half a second at least
    rep.tick(time.time())
    assert rep.tracer is not None and rep.tracer is not dead and rep.tracer.is_alive()
    state, error = shown(rep)[DISK]
    assert state in ("RESYNC_REQUIRED", "RESYNCING") and error == "REPL-INTERNAL", (state, error)
    wait("the resync", lambda: in_sync(rep, sim, image))  # the unseen write found by the checksums
    assert sim.chunks(connection=1)[-1] == 12
    sim.faults = Faults()
    write(image, tracefs, [40])  # and the new tracer traces the disk
    wait("the write on the replica", lambda: in_sync(rep, sim, image))


def test_a_clean_stop_ends_in_time_and_the_next_start_adopts_the_tracing_without_a_resync(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, tracefs: Tracefs, image: Path, paths: Paths
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    thread = rep.replicators[DISK]
    started = time.monotonic()
    rep.stop()
    took = time.monotonic() - started
    assert took < engine.STOP_SECONDS and not thread.is_alive(), took
    assert load_tracing_stop(paths) is not None and tracefs.dir is not None  # the instance goes on tracing
    tracefs.settle()
    write(image, tracefs, [5, 6])  # while the agent is down: in the kernel's buffer
    after = replication()
    after.apply(protect(sim, DISK))
    assert after.tracer is not None and after.tracer.adopted and after.tracer.continuous
    assert shown(after)[DISK] == ("CONTINUOUS", None)  # no resync...
    wait("the writes made while down on the replica", lambda: in_sync(after, sim, image))  # ...and nothing missed


def test_a_kept_tracing_without_its_stop_marker_is_not_trusted_and_the_next_start_resyncs(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, tracefs: Tracefs, image: Path
) -> None:
    """The instance still traces, but what it held since the stop is gone (another tool reset its buffer): the write
    made meanwhile went with it, and only the missing stop marker says so."""
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    rep.stop()
    tracefs.settle()
    write(image, tracefs, [7])
    assert b"mobility-stopped-" in tracefs.clear()
    sim.faults = Faults(ack_delay=0.5)  # the resync is shown for half a second at least
    after = replication()
    after.apply(protect(sim, DISK))
    assert after.tracer is not None and after.tracer.adopted and not after.tracer.continuous
    assert shown(after)[DISK][0] in ("RESYNC_REQUIRED", "RESYNCING")
    wait("the resync", lambda: in_sync(after, sim, image))  # chunk 7, found by the checksums
    sim.faults = Faults()


def test_a_point_request_is_cut_across_the_disks_and_answered(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, tracefs: Tracefs, image: Path, paths: Paths
) -> None:
    rep = replication()
    rep.apply(protect(sim, DISK))
    wait("the initial sync", lambda: in_sync(rep, sim, image))
    request = str(uuid.uuid4())
    leave_request(paths, request)
    rep.request_point()  # SIGUSR2
    rep.tick(time.time())
    answer: dict[str, object] = {}
    wait("the answer", lambda: answer.update(take_answer(paths, request) or {}) or answer)
    assert answer["ok"] is True, answer
    assert [p.point_id for p in sim.points] == [answer["point_id"]] and rep.points_cut == 1
    rep.tick(time.time())
    assert rep.report().last_point_id == answer["point_id"]


def test_a_point_request_with_no_disk_protected_is_refused_at_once(
    replication: Callable[[], Replication], sim: ProcessServerSimulator, paths: Paths
) -> None:
    rep = replication()
    rep.apply(protect(sim, "/dev/nosuchdisk"))
    request = str(uuid.uuid4())
    leave_request(paths, request)
    rep.request_point()
    answer = take_answer(paths, request)
    assert answer is not None and answer["ok"] is False and answer["error"] == "REPL-POINT-FAILED", answer
