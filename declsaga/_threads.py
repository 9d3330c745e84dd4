"""Worker threads for sync actions that must not block an event loop.

A bounded pool can deadlock when sync, async and sync actions nest through `ctx.run`
(every worker waiting for a call that needs another worker), so this pool grows on
demand: a task never waits for a thread. Idle threads are reused, then retire. Threads
are daemons: an abandoned compensator must not keep the interpreter alive at exit, which
`asyncio.to_thread` and `ThreadPoolExecutor` would.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["run", "submit"]

T = TypeVar("T")

_IDLE_SECONDS = 30.0

# (future, or None for `run`; the caller's context variables; the call)
_Task = tuple[Future[Any] | None, contextvars.Context, Callable[..., Any], tuple[Any, ...]]

# A plain lock under the condition: cheaper than the default RLock, never re-entered.
_lock = threading.Condition(threading.Lock())
_pending: deque[_Task] = deque()
_idle = 0


def submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run `fn(*args)` in a worker thread, in a copy of the caller's context variables."""
    future: Future[T] = Future()
    _queue((future, contextvars.copy_context(), fn, args))
    return future


def run(fn: Callable[..., object], *args: Any) -> None:
    """`submit` without a future, for a call that hands its outcome over by itself (a
    commit resolving asyncio futures): a `Future` costs a condition variable and two
    lock round trips. An exception that escapes `fn` anyway goes to `threading.excepthook`."""
    _queue((None, contextvars.copy_context(), fn, args))


def _queue(task: _Task) -> None:
    with _lock:
        _pending.append(task)
        # Every pending task is matched by an idle thread or by a new one.
        spawn = len(_pending) > _idle
        if not spawn:
            _lock.notify()
    if spawn:  # started outside the lock: `start` waits for the thread to run
        threading.Thread(target=_work, name="declsaga-worker", daemon=True).start()


def _work() -> None:
    global _idle  # the pool is process-wide by design
    while True:
        with _lock:
            _idle += 1
            while not _pending:
                if not _lock.wait(_IDLE_SECONDS) and not _pending:
                    _idle -= 1
                    return
            _idle -= 1
            future, context, fn, args = _pending.popleft()
        if future is None:
            try:
                context.run(fn, *args)
            except BaseException:  # a bug in `fn`: report it, keep the thread
                info = (*sys.exc_info(), threading.current_thread())
                threading.excepthook(threading.ExceptHookArgs(info))
                del info  # the traceback holds the call's frames
        elif future.set_running_or_notify_cancel():
            try:
                result = context.run(fn, *args)
            except BaseException as error:  # the caller decides what any error means
                future.set_exception(error)
            else:
                future.set_result(result)
        del future, context, fn, args  # drop references while idle


def _reset_in_child() -> None:
    # The parent's workers do not exist in a forked child: counting them as idle would
    # leave every task queued forever; the lock may have been held by one of them.
    global _lock, _pending, _idle  # the pool is process-wide by design
    _lock = threading.Condition(threading.Lock())
    _pending = deque()
    _idle = 0


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reset_in_child)
