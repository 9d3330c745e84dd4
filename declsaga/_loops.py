"""Crossing between threads and event loops without losing an exception or a task.

The executor's private loop (under `execute`) must be closed by the executor itself,
and work abandoned on it (compensators cut off by the budget) must neither block
`execute` nor leak warnings; outcomes handed between threads keep their exception
objects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from . import _threads

__all__ = [
    "Outcome",
    "as_coroutine",
    "cancel_leftovers",
    "capture",
    "captured",
    "close_loop",
    "consume",
    "finish_loop",
    "off_loop",
    "unwrap",
    "wait_uncancellable",
]

T = TypeVar("T")

# Loop turns that cancelled leftovers get to end before the private loop is handed off.
_SETTLE_TURNS = 5


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def as_coroutine(awaitable: Awaitable[T]) -> Coroutine[Any, Any, T]:
    if asyncio.iscoroutine(awaitable):
        return cast(Coroutine[Any, Any, T], awaitable)
    return _await(awaitable)


async def cancel_leftovers() -> bool:
    """Cancel every other task of the running loop; True once none is left."""
    current = asyncio.current_task()
    cancelled: set[asyncio.Task[Any]] = set()
    for _ in range(_SETTLE_TURNS):
        tasks = asyncio.all_tasks() - {current}
        if not tasks:
            return True
        for task in tasks - cancelled:
            task.cancel()
        cancelled |= tasks
        await asyncio.sleep(0)
    return not asyncio.all_tasks() - {current}


def finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run a private loop until its abandoned tasks end, then close it (daemon thread)."""
    try:
        loop.run_until_complete(_drain())
    finally:
        close_loop(loop)


async def _drain() -> None:
    current = asyncio.current_task()
    while tasks := asyncio.all_tasks() - {current}:
        await asyncio.wait(tasks)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


# Outcomes cross threads as (succeeded, value) pairs, never as a future's exception:
# asyncio replaces a TimeoutError or CancelledError crossing between concurrent and
# asyncio futures by a copy, and the spec promises the action's own exception object.
Outcome = tuple[bool, object]


def capture(fn: Callable[..., object], *args: object) -> Outcome:
    try:
        return True, fn(*args)
    except BaseException as error:  # handed to the waiting side, which raises it
        return False, error


async def captured(awaitable: Awaitable[object]) -> Outcome:
    try:
        return True, await awaitable
    except BaseException as error:  # handed to the waiting thread, which raises it
        return False, error


def unwrap(outcome: Outcome) -> object:
    succeeded, value = outcome
    if succeeded:
        return value
    raise cast(BaseException, value)


async def wait_uncancellable(waiter: asyncio.Future[Any]) -> None:
    while not waiter.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(waiter)


def consume(future: asyncio.Future[Any] | Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen: it was discarded on purpose."""
    if not future.cancelled():
        future.exception()


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread, for blocking I/O (a store commit) from the loop.

    Waited for even if the caller is cancelled meanwhile, so that a commit is never left
    half-known; the cancellation then propagates.
    """
    waiter = asyncio.wrap_future(_threads.submit(capture, fn, *args))
    cancelled: asyncio.CancelledError | None = None
    while not waiter.done():
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError as error:
            cancelled = error
    outcome = unwrap(waiter.result())
    if cancelled is not None:
        raise cancelled
    return cast(T, outcome)
