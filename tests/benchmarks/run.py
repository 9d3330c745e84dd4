"""`make bench`: the cost of a saga step against the cost of a plain function call.

Every figure is the median of several rounds, and is reported as a ratio to a baseline
measured in the same run, because this machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import declsaga
from declsaga import Context

STEPS = 10
ROUNDS = 7


def noop(ctx: Context) -> None:
    return None


async def anoop(ctx: Context) -> None:
    return None


def fail(ctx: Context) -> None:
    raise RuntimeError("step 10 fails")


def setup_of(step: Callable[[Context], object], *, failing: bool) -> declsaga.Setup:
    names = [f"s{i}" for i in range(STEPS)]
    actions: dict[str, Callable[[Context], object]] = dict.fromkeys(names, step)
    actions.update({f"undo-{name}": step for name in names})
    if failing:
        actions[names[-1]] = fail
    return declsaga.new(
        actions, sequence=names, compensators={name: f"undo-{name}" for name in names}
    )


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Median seconds per call of `fn` over ROUNDS rounds of `calls` calls."""
    samples = []
    for _ in range(ROUNDS):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - begin) / calls)
    return statistics.median(samples)


def baseline() -> float:
    """Ten plain function calls: what a saga of ten no-op steps does at the very least."""

    def ten_calls() -> None:
        for _ in range(STEPS):
            noop(None)  # type: ignore[arg-type]

    return per_call(ten_calls, 20_000)


def bench_sync(failing: bool) -> float:
    executor = declsaga.Executor(compensate_timeout=float("inf"))
    setup = setup_of(noop, failing=failing)

    def once() -> None:
        try:  # noqa: SIM105 - cheaper than contextlib.suppress in a timed loop
            executor.execute(setup)
        except RuntimeError:
            pass

    return per_call(once, 300 if failing else 2_000)


def bench_async(failing: bool) -> float:
    executor = declsaga.Executor(compensate_timeout=float("inf"))
    setup = setup_of(anoop, failing=failing)
    if failing:
        setup = declsaga.new(
            {**{f"s{i}": anoop for i in range(STEPS - 1)}, "s9": fail,
             **{f"undo-s{i}": anoop for i in range(STEPS)}},
            sequence=[f"s{i}" for i in range(STEPS)],
            compensators={f"s{i}": f"undo-s{i}" for i in range(STEPS)},
        )  # fmt: skip
    calls = 300 if failing else 2_000

    async def rounds() -> float:
        samples = []
        for _ in range(ROUNDS):
            begin = time.perf_counter()
            for _ in range(calls):
                try:  # noqa: SIM105 - cheaper than contextlib.suppress in a timed loop
                    await executor.execute_async(setup)
                except RuntimeError:
                    pass
            samples.append((time.perf_counter() - begin) / calls)
        return statistics.median(samples)

    return asyncio.run(rounds())


def main() -> None:
    base = baseline()
    rows = [
        ("10 plain function calls (baseline)", base),
        ("in-memory, sync, success", bench_sync(failing=False)),
        ("in-memory, sync, step 10 fails (9 compensations)", bench_sync(failing=True)),
        ("in-memory, async, success", bench_async(failing=False)),
        ("in-memory, async, step 10 fails (9 compensations)", bench_async(failing=True)),
    ]
    print(
        f"declsaga benchmarks, {date.today()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores, median of {ROUNDS} rounds"
    )
    print(f"{'case':<52} {'us/saga':>10} {'us/step':>9} {'x baseline':>11}")
    for name, seconds in rows:
        print(
            f"{name:<52} {seconds * 1e6:>10.2f} {seconds * 1e6 / STEPS:>9.2f} "
            f"{seconds / base:>11.1f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
