"""Crossing between threads and event loops without losing an exception or a task.

The executor's private loop (under `execute`) must be closed by the executor itself,
and work abandoned on it (compensators cut off by the budget) must neither block
`execute` nor leak warnings; outcomes handed between threads keep their exception
objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from . import _threads

__all__ = [
    "Handoff",
    "Outcome",
    "as_coroutine",
    "cancel_leftovers",
    "capture",
    "captured",
    "close_loop",
    "consume",
    "deliver_all",
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


class Handoff:
    """What a worker thread hands to a task that waits for it on an event loop.

    The worker calls `deliver_all` once the outcome is in place (one loop wake-up for
    many tasks, of one or several loops); the task `wait`s until then even if it is
    cancelled meanwhile, so that work it started is never left half-known. Lighter than
    a `concurrent.futures.Future` wrapped in an asyncio one, which takes a condition
    variable, two callbacks and a shield per hop.
    """

    __slots__ = ("_delivered", "_future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._delivered = False

    def _wake(self) -> None:
        # On the loop's thread. A cancellation may have taken the future meanwhile (the
        # task then wakes to a fresh one, or sees `_delivered`).
        self._delivered = True
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> asyncio.CancelledError | None:
        """Wait for the delivery, to the end; return the last cancellation received
        meanwhile."""
        cancelled = None
        while not self._delivered:
            try:
                await self._future
            except asyncio.CancelledError as error:
                cancelled = error
                if self._future.cancelled():  # it was the wait, not the outcome, that ended
                    self._future = self.loop.create_future()
        return cancelled


def deliver_all(handoffs: Iterable[Handoff]) -> None:
    """From any thread: wake the tasks waiting for `handoffs`, with one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Handoff]] = {}
    for handoff in handoffs:
        by_loop.setdefault(handoff.loop, []).append(handoff)
    for loop, handed in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits there
            loop.call_soon_threadsafe(_wake_all, handed)


def _wake_all(handoffs: list[Handoff]) -> None:
    for handoff in handoffs:
        handoff._wake()


# Off-loop calls (store I/O) of one loop run in order in one worker thread, which then
# wakes their tasks together: a thread per call costs a thread wake-up, a loop wake-up
# and GIL hand-offs among many threads, for calls that mostly wait on the same store
# connection anyway. A call that waits longer than _SLOW behind running ones gets a thread
# of its own, so one slow call (a busy database, a network round trip) delays the others
# by at most about that, and a call that waits for another queued one cannot deadlock.
# Once a call of a loop took longer than _SLOW, its later calls get a thread each at once,
# as long as calls keep coming (a store that waits on the network gains nothing from
# running its calls in turn).
_SLOW = 0.001


class _Call(Handoff):
    __slots__ = ("args", "context", "fn", "outcome", "queued")

    outcome: Outcome

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., object], args: Any
    ) -> None:
        super().__init__(loop)
        self.fn: Callable[..., object] | None = fn
        self.args: tuple[Any, ...] = args
        self.context: contextvars.Context | None = contextvars.copy_context()
        self.queued = time.monotonic()

    def run(self) -> None:
        assert self.context is not None and self.fn is not None
        self.outcome = self.context.run(capture, self.fn, *self.args)
        self.fn, self.args, self.context = None, (), None  # drop references early


class _Drain:
    """The off-loop calls of one event loop: queued, running, and done but not yet woken."""

    __slots__ = ("done", "loop", "queue", "slow", "timer", "workers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[_Call] = deque()
        self.workers = 0  # threads taking calls from the queue
        self.slow = False  # a call took longer than _SLOW: a thread for each call
        self.done: list[_Call] | None = None  # with a wake-up scheduled on the loop
        self.timer: asyncio.TimerHandle | None = None  # checks for calls waiting too long


_drains: dict[asyncio.AbstractEventLoop, _Drain] = {}
_drains_lock = threading.Lock()


def _work(drain: _Drain) -> None:
    """Run queued calls until none is left; a worker thread."""
    while True:
        with _drains_lock:
            if not drain.queue:
                drain.workers -= 1
                if drain.workers == 0 and _drains.get(drain.loop) is drain:
                    del _drains[drain.loop]
                return
            call = drain.queue.popleft()
        started = time.monotonic()
        call.run()
        slow = time.monotonic() - started > _SLOW
        with _drains_lock:
            if slow:
                drain.slow = True
            done = drain.done
            wake = done is None
            if done is None:
                drain.done = [call]
            else:
                done.append(call)
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits there
                drain.loop.call_soon_threadsafe(_wake_done, drain)


def _wake_done(drain: _Drain) -> None:
    with _drains_lock:
        done, drain.done = drain.done or [], None
    for call in done:
        call._wake()


def _check(drain: _Drain) -> None:
    """On the loop: give a thread to each call that waited too long, while any waits."""
    with _drains_lock:
        drain.timer = None
        if not drain.queue:
            return
        late = 0
        now = time.monotonic()
        for call in drain.queue:
            if now - call.queued < _SLOW:
                break
            late += 1
        drain.workers += late
        drain.timer = drain.loop.call_later(_SLOW, _check, drain)
    for _ in range(late):
        _threads.run(_work, drain)


async def off_loop(
    fn: Callable[..., T], *args: Any, undo: Callable[[Any], object] | None = None
) -> T:
    """`fn(*args)` in a worker thread, for blocking I/O (a store commit) from the loop.

    Waited for even if the caller is cancelled meanwhile, so that a commit is never left
    half-known; the cancellation then propagates, after `undo(result)` if given (so that,
    say, a claim the caller will never see is given back).
    """
    loop = asyncio.get_running_loop()
    call = _Call(loop, fn, args)
    with _drains_lock:
        drain = _drains.get(loop)
        if drain is None:
            drain = _drains[loop] = _Drain(loop)
        drain.queue.append(call)
        start = drain.workers == 0 or drain.slow
        if start:
            drain.workers += 1
        if drain.timer is None:
            drain.timer = loop.call_later(_SLOW, _check, drain)
    if start:
        _threads.run(_work, drain)
    cancelled = await call.wait()
    outcome = cast(T, unwrap(call.outcome))
    if cancelled is not None:
        if undo is not None and outcome is not None:
            undo(outcome)
        raise cancelled
    return outcome


def _reset_in_child() -> None:
    # The workers of the parent do not exist in a forked child.
    global _drains_lock  # process-wide by design
    _drains.clear()
    _drains_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reset_in_child)
