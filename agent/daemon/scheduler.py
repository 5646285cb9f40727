"""The `schedule` library driven by an injected clock, so the daemon's `tick(now)` can be run by tests with
their own time (hours of schedule in milliseconds). Only interval jobs in seconds are used."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import schedule

Clock = Callable[[], dt.datetime]


class ClockJob(schedule.Job):
    def __init__(self, interval: float, scheduler: schedule.Scheduler, clock: Clock) -> None:
        super().__init__(interval, scheduler)  # type: ignore[arg-type]  # schedule annotates int, accepts float
        self._clock = clock

    @property
    def should_run(self) -> bool:
        return self.next_run is not None and self._clock() >= self.next_run

    def _schedule_next_run(self) -> None:
        if self.unit != "seconds":
            raise schedule.ScheduleValueError("ClockJob supports every(N).seconds only")
        self.period = dt.timedelta(seconds=self.interval)
        self.next_run = self._clock() + self.period


class ClockScheduler(schedule.Scheduler):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock

    def every(self, interval: float = 1) -> ClockJob:
        return ClockJob(interval, self, self._clock)

    def seconds_to_next(self) -> float | None:
        """Seconds from the clock's now until the next job is due (None without jobs)."""
        pending = [job.next_run for job in self.jobs if job.next_run is not None]
        return (min(pending) - self._clock()).total_seconds() if pending else None
