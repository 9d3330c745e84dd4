"""Doing one thing to many sagas, several at once: threads, or tasks on the loop.

The results keep the order of the inputs. The first failure stops new work: what runs
finishes, then that failure is raised."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["check_concurrency", "each", "each_async"]

T = TypeVar("T")
R = TypeVar("R")


def check_concurrency(concurrency: object) -> None:
    if type(concurrency) is not int or concurrency < 1:
        raise ValueError(f"concurrency must be an int of at least 1, got {concurrency!r}.")


def each(items: Sequence[T], concurrency: int, fn: Callable[[T], R]) -> list[R]:
    """`[fn(item) for item in items]`, `concurrency` calls at once on threads (on the
    calling thread alone for 1)."""
    results: list[R | None] = [None] * len(items)
    failures: list[BaseException] = []
    lock = threading.Lock()
    indexes = iter(range(len(items)))

    def work() -> None:
        while True:
            with lock:
                index = None if failures else next(indexes, None)
            if index is None:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as error:
                with lock:
                    failures.append(error)
                return

    if concurrency == 1:
        work()
    else:
        threads = [
            threading.Thread(target=work, name=f"declsaga-each-{n}", daemon=True)
            for n in range(min(concurrency, len(items)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]  # every slot was filled


async def each_async(
    items: Sequence[T], concurrency: int, fn: Callable[[T], Awaitable[R]]
) -> list[R]:
    """`each` as tasks of the running loop."""
    results: list[R | None] = [None] * len(items)
    failures: list[BaseException] = []
    indexes = iter(range(len(items)))

    async def work() -> None:
        while not failures and (index := next(indexes, None)) is not None:
            try:
                results[index] = await fn(items[index])
            except BaseException as error:
                failures.append(error)
                return

    await asyncio.gather(*(work() for _ in range(min(concurrency, len(items)))))
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]  # every slot was filled
