"""Waiting for a stored saga to end, wherever it runs: notified by stores that can
(`wait_ended`, PostgreSQL's LISTEN/NOTIFY), polled on the others."""

from __future__ import annotations

import asyncio
import math
import time

from ._errors import UsageError, describe
from ._loops import off_loop
from .stores._base import FINAL_STATUSES, Store, StoredSaga

__all__ = ["check_saga_id", "load_known", "until_ended", "until_ended_async"]

# Polling a store without notifications: from 5 ms, doubling up to a quarter second.
_FIRST_POLL = 0.005
_LAST_POLL = 0.25
_LONGEST_WAIT = 5.0  # one wait for a notification; the status is checked again after it


def check_saga_id(saga_id: object) -> None:
    if not isinstance(saga_id, str) or not saga_id.strip():
        raise UsageError(f"saga_id must be a non-empty string, got {describe(saga_id)}.")


def load_known(store: Store, saga_id: str) -> StoredSaga:
    stored = store.load(saga_id)
    if stored is None:
        raise UsageError(f"Saga {saga_id!r} is not in {store!r}: submit or execute it first.")
    return stored


def until_ended(store: Store, saga_id: str, timeout: float | None) -> StoredSaga:
    """The saga once it has ended; `TimeoutError` if it has not within `timeout`."""
    waiting = _Waiting(store, saga_id, timeout)
    while True:
        stored = load_known(store, saga_id)
        if stored.status in FINAL_STATUSES:
            return stored
        seconds = waiting.next_wait(stored.status, _LONGEST_WAIT)
        if waiting.notified is not None:
            waiting.notified(saga_id, seconds)
        else:
            time.sleep(seconds)


async def until_ended_async(store: Store, saga_id: str, timeout: float | None) -> StoredSaga:
    """`until_ended` from the loop, which it never blocks."""
    waiting = _Waiting(store, saga_id, timeout)
    while True:
        stored = await off_loop(load_known, store, saga_id)
        if stored.status in FINAL_STATUSES:
            return stored
        # Short waits for a notification: a cancelled wait is not held up for long.
        seconds = waiting.next_wait(stored.status, _LAST_POLL)
        if waiting.notified is not None:
            await off_loop(waiting.notified, saga_id, seconds)
        else:
            await asyncio.sleep(seconds)


class _Waiting:
    """The deadline of one wait, and how long to wait next."""

    def __init__(self, store: Store, saga_id: str, timeout: float | None) -> None:
        check_saga_id(saga_id)
        if timeout is not None and (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not timeout >= 0  # NaN fails this too
        ):
            raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}.")
        self.saga_id = saga_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.notified = getattr(store, "wait_ended", None)  # an optional capability
        self.pause = _FIRST_POLL

    def next_wait(self, status: str, longest: float) -> float:
        """Seconds to wait before looking again; `TimeoutError` once none are left."""
        remaining = math.inf
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Saga {self.saga_id!r} did not end within {self.timeout:g}s; it is {status}."
                )
        if self.notified is not None:
            return min(remaining, longest)
        pause, self.pause = self.pause, min(self.pause * 2, _LAST_POLL)
        return min(remaining, pause)
