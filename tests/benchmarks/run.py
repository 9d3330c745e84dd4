"""`make bench`: the cost of a saga step against the cost of a plain function call.

Every figure is the median of several rounds, and is reported as a ratio to a baseline
measured in the same run, because this machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import postgres

import declsaga
from declsaga import Context

HERE = Path(__file__).parent
ROOT = HERE.parent.parent

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


# -- recovery and memory ---------------------------------------------------------------------


def bench_recovery(directory: Path, concurrency: int, sagas: int = 10_000) -> float:
    """Seconds for `recover(concurrency=...)` to finish `sagas` sagas that a killed
    process left unfinished in one SQLite file (their first step started, not finished)."""
    path = directory / f"recovery-{concurrency}.db"
    url = f"sqlite:///{path}"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    script = str(HERE / "orphans.py")
    subprocess.run([sys.executable, script, url, str(sagas)], env=env, check=True)
    with declsaga.SQLiteStore(path) as store:
        begin = time.perf_counter()
        recovered = declsaga.Executor(store=store).recover(concurrency=concurrency)
        elapsed = time.perf_counter() - begin
    assert len(recovered) == sagas and all(r.status == "completed" for r in recovered)
    return elapsed


def bench_memory(sagas: int = 10_000) -> float:
    """Bytes per in-flight saga: `sagas` async sagas started at once, each waiting in
    its first step, measured with tracemalloc against the same tasks without a saga."""
    gate = asyncio.Event()

    async def wait(ctx: Context) -> None:
        await gate.wait()

    setup = declsaga.new({"wait": wait, "after": anoop}, sequence=["wait", "after"])
    executor = declsaga.Executor()

    async def held(start: Callable[[], Any]) -> int:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(start()) for _ in range(sagas)]
        await asyncio.sleep(0.1)  # every task reaches its wait
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        gate.set()
        await asyncio.gather(*tasks)
        gate.clear()
        return used

    async def both() -> float:
        with_saga = await held(lambda: executor.execute_async(setup))
        bare = await held(gate.wait)  # the task and its wait alone: the baseline
        return (with_saga - bare) / sagas

    return asyncio.run(both())


# -- the table ---------------------------------------------------------------------------------


class Table:
    """Rows of (measure, figure, baseline, ratio), printed as one table and written to
    BENCHMARKS.md."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, measure: str, figure: str, baseline: str = "", ratio: str = "") -> None:
        self.rows.append((measure, figure, baseline, ratio))
        print(f"{measure:<58} {figure:>18} {baseline:>34} {ratio:>8}", flush=True)

    def markdown(self, heading: str) -> str:
        lines = [
            heading,
            "",
            "| measure | figure | baseline (same run) | ratio |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"


def main() -> None:
    heading = (
        f"declsaga benchmarks, {date.today()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores; medians of {ROUNDS} rounds; `make bench`"
    )
    print(heading + "\n")
    table = Table()
    base = baseline()
    table.add("10 plain function calls", f"{base * 1e6:.2f} us")
    for name, seconds in [
        ("in-memory, sync, success", bench_sync(failing=False)),
        ("in-memory, sync, step 10 fails (9 compensations)", bench_sync(failing=True)),
        ("in-memory, async, success", bench_async(failing=False)),
        ("in-memory, async, step 10 fails (9 compensations)", bench_async(failing=True)),
    ]:
        table.add(
            f"{name}, per step", f"{seconds * 1e6 / STEPS:.2f} us", "10 plain calls / 10",
            f"{seconds / base:.0f}x",
        )  # fmt: skip
    with tempfile.TemporaryDirectory() as directory:
        for level in ("FULL", "NORMAL"):
            raw, step = bench_durable(level, Path(directory))
            table.add(
                f"durable step, SQLite synchronous={level}", f"{step * 1e6:.1f} us",
                f"raw INSERT+COMMIT {raw * 1e6:.1f} us", f"{step / raw:.2f}x",
            )  # fmt: skip
        for level in ("FULL", "NORMAL"):
            one = bench_concurrent(level, Path(directory), 1)
            for concurrency in (1, 8, 32):
                rate = (
                    one
                    if concurrency == 1
                    else bench_concurrent(level, Path(directory), concurrency)
                )
                table.add(
                    f"{concurrency} concurrent async sagas, SQLite {level}", f"{rate:,.0f} steps/s",
                    f"1 saga: {one:,.0f} steps/s", f"{rate / one:.2f}x",
                )  # fmt: skip
        for concurrency in (1, 32):
            recovery = bench_recovery(Path(directory), concurrency)
            table.add(
                f"recover(concurrency={concurrency}) 10,000 interrupted sagas, SQLite FULL",
                f"{recovery:.2f} s", f"{recovery / 10_000 * 1e6:.0f} us per saga",
            )  # fmt: skip
    table.add("memory per in-flight async saga (10,000 at once)", f"{bench_memory():,.0f} bytes")
    in_transaction, one_trip, step = postgres.durable_step(ROUNDS)
    table.add(
        "durable step, PostgreSQL", f"{step * 1e6:.0f} us",
        f"raw psycopg INSERT+COMMIT {in_transaction * 1e6:.0f} us", f"{step / in_transaction:.2f}x",
    )  # fmt: skip
    table.add(
        "durable step, PostgreSQL", f"{step * 1e6:.0f} us",
        f"raw INSERT in autocommit {one_trip * 1e6:.0f} us", f"{step / one_trip:.2f}x",
    )  # fmt: skip
    one_worker = 0.0
    for workers in (1, 2, 4):
        rate = postgres.worker_throughput(workers, sagas=400)
        one_worker = one_worker or rate
        table.add(
            f"{workers} worker process(es) x 4 slots, PostgreSQL",
            f"{rate:,.0f} sagas/s ({rate * STEPS:,.0f} steps/s)",
            f"1 worker: {one_worker:,.0f} sagas/s", f"{rate / one_worker:.2f}x",
        )  # fmt: skip
    takeover = postgres.takeover(1_000)
    table.add(
        "take over 1,000 orphaned sagas (1 worker, 8 slots), PostgreSQL",
        f"{takeover:.2f} s", f"{takeover / 1000 * 1e3:.2f} ms per saga",
    )  # fmt: skip
    (ROOT / "BENCHMARKS.md").write_text(table.markdown(f"# Benchmarks\n\n{heading}"))
    print("\nWritten to BENCHMARKS.md.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
