"""`make bench`: the cost of a saga step against the cost of a plain function call.

Every figure is the median of several rounds, and is reported as a ratio to a baseline
measured in the same run, because this machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

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


# -- durable execution on SQLite ------------------------------------------------------------

ENTRY = '[{"kind":"run_succeeded","run":3,"at":1.5},{"kind":"run_started","run":4,"at":1.6}]'


def raw_commits(connection: sqlite3.Connection, count: int, offset: int) -> float:
    """Seconds per raw `BEGIN IMMEDIATE; INSERT; COMMIT` of a journal-sized row."""
    begin = time.perf_counter()
    for i in range(offset, offset + count):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO t VALUES (?, ?, ?)", (f"saga-{i // 10}", i % 10, ENTRY))
        connection.execute("COMMIT")
    return (time.perf_counter() - begin) / count


def durable_steps(executor: declsaga.Executor, setup: declsaga.Setup, sagas: int) -> float:
    """Seconds per step of a 10-step no-op saga run durably."""
    begin = time.perf_counter()
    for _ in range(sagas):
        executor.execute(setup)
    return (time.perf_counter() - begin) / (sagas * STEPS)


def bench_durable(level: str, directory: Path) -> tuple[float, float]:
    """Median seconds per raw commit and per durable step, measured in alternating rounds
    (the disk's fsync latency drifts; alternating keeps both sides on the same drift)."""
    raw = sqlite3.connect(directory / f"raw-{level}.db", isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute(f"PRAGMA synchronous={level}")
    raw.execute("CREATE TABLE t (k TEXT, seq INTEGER, v TEXT, PRIMARY KEY (k, seq)) WITHOUT ROWID")
    store = declsaga.SQLiteStore(directory / f"durable-{level}.db", synchronous=level)
    executor = declsaga.Executor(store=store)
    names = [f"s{i}" for i in range(STEPS)]
    setup = declsaga.new(dict.fromkeys(names, noop), sequence=names, name=f"bench.durable.{level}")
    commits, sagas = (200, 20) if level == "FULL" else (3_000, 300)
    raw_commits(raw, commits, 0)  # warm up both
    durable_steps(executor, setup, sagas // 10)
    raws, steps = [], []
    for round_ in range(ROUNDS):
        raws.append(raw_commits(raw, commits, (round_ + 1) * commits))
        steps.append(durable_steps(executor, setup, sagas))
    raw.close()
    store.close()
    return statistics.median(raws), statistics.median(steps)


def bench_concurrent(level: str, directory: Path, concurrency: int) -> float:
    """Steps per second of `concurrency` async sagas run at once in one process."""
    store = declsaga.SQLiteStore(
        directory / f"concurrent-{level}-{concurrency}.db", synchronous=level
    )
    executor = declsaga.Executor(store=store)
    names = [f"s{i}" for i in range(STEPS)]
    setup = declsaga.new(
        dict.fromkeys(names, anoop), sequence=names, name=f"bench.concurrent.{level}"
    )
    total = 640 if level == "FULL" else 1_280  # sagas per round, whatever the concurrency

    async def rounds() -> float:
        samples = []
        for _ in range(ROUNDS):
            begin = time.perf_counter()
            for _ in range(total // concurrency):
                await asyncio.gather(*(executor.execute_async(setup) for _ in range(concurrency)))
            samples.append(total * STEPS / (time.perf_counter() - begin))
        return statistics.median(samples)

    try:
        return asyncio.run(rounds())
    finally:
        store.close()


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
    print(f"\n{'in-memory saga of 10 steps':<52} {'us/saga':>10} {'us/step':>9} {'x baseline':>11}")
    for name, seconds in rows:
        print(
            f"{name:<52} {seconds * 1e6:>10.2f} {seconds * 1e6 / STEPS:>9.2f} "
            f"{seconds / base:>11.1f}"
        )
    with tempfile.TemporaryDirectory() as directory:
        title = "durable step on SQLite (WAL)"
        print(f"\n{title:<52} {'raw commit':>10} {'us/step':>9} {'x raw':>11}")
        for level in ("FULL", "NORMAL"):
            raw, step = bench_durable(level, Path(directory))
            print(
                f"{'synchronous=' + level:<52} {raw * 1e6:>8.1f}us {step * 1e6:>9.1f} "
                f"{step / raw:>11.2f}"
            )
        print(
            f"\n{'concurrent async sagas, one process':<52} {'steps/s':>10} {'':>9} {'x one':>11}"
        )
        for level in ("FULL", "NORMAL"):
            one = bench_concurrent(level, Path(directory), 1)
            for concurrency in (1, 8, 32):
                rate = (
                    one
                    if concurrency == 1
                    else bench_concurrent(level, Path(directory), concurrency)
                )
                label = f"synchronous={level}, {concurrency} at once"
                print(f"{label:<52} {rate:>10.0f} {'':>9} {rate / one:>11.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
