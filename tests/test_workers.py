"""What parallel workers share (tests/workers.py): made once whoever asks, and a solo test alone. flock excludes
separate opens of a file within one process too, so threads stand in for the workers here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import workers


@pytest.fixture(autouse=True)
def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workers.RUN, str(tmp_path))


def _together(*targets: Callable[[], object]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_once_makes_it_once_for_every_asker_and_again_after_a_failure(tmp_path: Path) -> None:
    made: list[Path] = []
    got: list[Path] = []

    def make(where: Path) -> None:
        time.sleep(0.2)  # the others ask meanwhile
        (where / "built").write_text("x")
        made.append(where)

    _together(*[lambda: got.append(workers.once("dist", make))] * 4)
    assert made == [tmp_path / "dist"] and got == made * 4 and (tmp_path / "dist" / "built").is_file()

    def broken(where: Path) -> None:
        (where / "half").write_text("x")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError):
        workers.once("other", broken)
    assert not (tmp_path / "other").exists()  # nothing half-made is handed to the next asker, who tries again
    assert (workers.once("other", make) / "built").is_file()


def test_a_solo_test_runs_alone() -> None:
    spans: dict[str, tuple[float, float]] = {}

    def run(name: str, solo: bool, delay: float) -> None:
        time.sleep(delay)
        with workers.turn(solo):
            start = time.monotonic()
            time.sleep(0.3)
            spans[name] = (start, time.monotonic())

    _together(
        lambda: run("a", False, 0.0),
        lambda: run("b", False, 0.0),
        lambda: run("solo", True, 0.1),  # asks while a and b run
        lambda: run("c", False, 0.2),  # asks while the solo test waits: goes after it
    )
    solo = spans["solo"]
    others = [spans[n] for n in ("a", "b", "c")]
    assert all(end <= solo[0] or start >= solo[1] for start, end in others), spans
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1]  # the others overlap each other
    assert spans["c"][0] >= solo[1]  # not starved: the gate held new tests back while it waited
