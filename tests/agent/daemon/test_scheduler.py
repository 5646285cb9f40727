"""agent/daemon/scheduler.py drives the `schedule` library by an injected clock through Job._schedule_next_run, a
private hook: pyproject.toml pins the tested range, and these tests fail when a release changes the hook or stops
calling it (then the jobs would be scheduled by the wall clock and never become due on the daemon's clock)."""

from __future__ import annotations

import datetime as dt
import inspect

import pytest
import schedule

from agent.daemon.scheduler import ClockScheduler

T0 = dt.datetime(2001, 1, 1, 12, 0, 0)  # far from the wall clock: a job scheduled by it would never be due here


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def test_the_hook_the_subclass_overrides_is_the_one_schedule_calls() -> None:
    assert "_schedule_next_run" in vars(schedule.Job)
    for method in (schedule.Job.do, schedule.Job.run):
        assert "self._schedule_next_run()" in inspect.getsource(method), method


def test_jobs_run_by_the_injected_clock() -> None:
    clock, ran = Clock(), []
    scheduler = ClockScheduler(clock)
    scheduler.every(30).seconds.do(lambda: ran.append(clock()))
    scheduler.every(3600).seconds.do(lambda: ran.append("hourly"))
    assert scheduler.seconds_to_next() == 30
    clock.advance(29.5)
    scheduler.run_pending()
    assert ran == []
    clock.advance(0.5)
    scheduler.run_pending()
    assert ran == [T0 + dt.timedelta(seconds=30)]
    assert scheduler.seconds_to_next() == 30  # rescheduled from the injected clock, not the wall clock
    for _ in range(120):  # an hour in 30 s steps
        clock.advance(30)
        scheduler.run_pending()
    assert ran.count("hourly") == 1 and len(ran) == 122


def test_only_seconds_are_supported() -> None:
    scheduler = ClockScheduler(Clock())
    with pytest.raises(schedule.ScheduleValueError):
        scheduler.every(1).minutes.do(lambda: None)
