"""Worker threads for sync actions that must not block an event loop.

A bounded pool can deadlock when sync, async and sync actions nest through `ctx.run`
(every worker waiting for a call that needs another worker), so this pool grows on
demand: a task never waits for a thread. Idle threads are reused, then retire. Threads
are daemons: an abandoned compensator must not keep the interpreter alive at exit, which
`asyncio.to_thread` and `ThreadPoolExecutor` would.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["submit"]

T = TypeVar("T")

_IDLE_SECONDS = 30.0

_Task = tuple[Future[Any], contextvars.Context, Callable[..., Any], tuple[Any, ...]]

_lock = threading.Condition()
_pending: deque[_Task] = deque()
_idle = 0


def submit(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run `fn(*args)` in a worker thread, in a copy of the caller's context variables."""
    future: Future[T] = Future()
    with _lock:
        _pending.append((future, contextvars.copy_context(), fn, args))
        # Every pending task is matched by an idle thread or by a new one.
        if len(_pending) > _idle:
            threading.Thread(target=_work, name="declsaga-worker", daemon=True).start()
        else:
            _lock.notify()
    return future


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
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = context.run(fn, *args)
        except BaseException as error:  # the caller decides what any error means
            future.set_exception(error)
        else:
            future.set_result(result)
        del future, context, fn, args  # drop references while idle
