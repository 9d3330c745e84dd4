"""`FakeClock`: virtual time for tests of retry schedules and deadlines."""

from __future__ import annotations

import asyncio
import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A `declsaga.policies.Clock` whose time moves only when something sleeps on it:
    retry schedules and deadlines are tested without waiting. `sleeps` lists every
    sleep asked of it, in seconds, in order.

    Pass it as `Executor(clock=FakeClock())`; actions can call `clock.sleep(seconds)` to
    take time. Timeouts of running actions are not fake: they use real threads and tasks.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    async def sleep_async(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)  # still a suspension point, as a real sleep is
