"""PostgreSQL figures for `make bench`: a durable step against a raw commit, workers'
throughput, and the takeover of orphaned sagas. Each runs on a fresh schema of the
server at `$DECLSAGA_TEST_POSTGRES` (or the local one), dropped afterwards."""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import benchsagas
import psycopg
from psycopg import sql

from declsaga import Executor, PostgresStore
from declsaga.stores import FINAL_STATUSES
from declsaga.worker import Worker

DSN = os.environ.get("DECLSAGA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
HERE = Path(__file__).parent
ENTRY = '[{"kind":"run_succeeded","run":3,"at":1.5},{"kind":"run_started","run":4,"at":1.6}]'


@contextmanager
def fresh_schema() -> Iterator[str]:
    name = f"declsaga_bench_{secrets.token_hex(6)}"
    try:
        yield name
    finally:
        with psycopg.connect(DSN, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
            )


def url_of(schema: str, **params: object) -> str:
    parts = urlsplit(DSN)
    query = "&".join(filter(None, [parts.query, urlencode({"schema": schema, **params})]))
    return urlunsplit(parts._replace(query=query))


def durable_step(rounds: int) -> tuple[float, float, float]:
    """Median seconds per raw commit, two ways, and per durable step of a 10-step no-op
    saga, in alternating rounds. The raw commits insert a journal-sized row: with
    psycopg's defaults (a transaction: BEGIN, INSERT, COMMIT), and in autocommit (one
    round trip, the least a commit can cost)."""
    with fresh_schema() as schema, PostgresStore(DSN, schema=schema) as store:
        autocommit = psycopg.connect(DSN, autocommit=True)
        transaction = psycopg.connect(DSN)
        table = sql.Identifier(schema, "raw")
        create = sql.SQL("CREATE TABLE {} (k TEXT, seq INT, v TEXT, PRIMARY KEY (k, seq))")
        autocommit.execute(create.format(table))
        insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(table)
        executor = Executor(store=store)
        commits, sagas = 500, 50
        done = 0

        def raw_commits(connection: psycopg.Connection[object]) -> float:
            nonlocal done
            begin = time.perf_counter()
            for i in range(done, done + commits):
                connection.execute(insert, (f"saga-{i // 10}", i % 10, ENTRY), prepare=True)
                connection.commit()  # a no-op in autocommit
            done += commits
            return (time.perf_counter() - begin) / commits

        def steps() -> float:
            begin = time.perf_counter()
            for _ in range(sagas):
                executor.execute(benchsagas.TEN)
            return (time.perf_counter() - begin) / (sagas * benchsagas.STEPS)

        raw_commits(transaction), raw_commits(autocommit), steps()  # warm up
        in_transaction, one_trip, durables = [], [], []
        for _ in range(rounds):
            in_transaction.append(raw_commits(transaction))
            one_trip.append(raw_commits(autocommit))
            durables.append(steps())
        autocommit.close()
        transaction.close()
    return (
        statistics.median(in_transaction),
        statistics.median(one_trip),
        statistics.median(durables),
    )


def _workers(url: str, count: int, concurrency: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "declsaga",
                "worker",
                "--store",
                url,
                "--import",
                "benchsagas",
                "--concurrency",
                str(concurrency),
                "--poll-interval",
                "0.05",
                "--log-level",
                "WARNING",
            ],
            env=env,
            text=True,
        )
        for _ in range(count)
    ]


def _stop(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(60)


def _span(store: PostgresStore, saga_ids: list[str]) -> float:
    """Seconds from the first run's start to the last saga's end, by the journal's
    times (the server's clock): the workers' start-up is not counted."""
    first, last = float("inf"), 0.0
    for saga_id in saga_ids:
        saga = store.load(saga_id)
        assert saga is not None and saga.status in FINAL_STATUSES
        ats = [entry["at"] for entry in saga.entries if isinstance(entry, dict) and "at" in entry]
        first, last = min(first, *ats), max(last, *ats)
    return last - first


def worker_throughput(workers: int, sagas: int, concurrency: int = 4) -> float:
    """Sagas per second that `workers` worker processes finish, `concurrency` each."""
    with fresh_schema() as schema, PostgresStore(DSN, schema=schema) as store:
        executor = Executor(store=store)
        saga_ids = [executor.submit(benchsagas.TEN) for _ in range(sagas)]
        started = _workers(url_of(schema), workers, concurrency)
        try:
            deadline = time.monotonic() + 300
            while store.unfinished() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            _stop(started)
        return sagas / _span(store, saga_ids)


def takeover(orphans: int, lease: float = 1.0, concurrency: int = 8) -> float:
    """Seconds for one worker to take over and finish `orphans` sagas left by a dead
    process, once their leases ran out."""
    with fresh_schema() as schema:
        url = url_of(schema, lease=lease)
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        subprocess.run(
            [sys.executable, str(HERE / "orphans.py"), url, str(orphans)], env=env, check=True
        )
        with PostgresStore(DSN, schema=schema, lease=lease) as store:
            assert len(store.unfinished()) == orphans
            time.sleep(lease * 1.5)  # the dead process's leases run out
            worker = Worker(Executor(store=store), concurrency=concurrency, poll_interval=0.01)
            running = threading.Thread(target=worker.run)
            begin = time.perf_counter()
            running.start()
            while store.unfinished():
                time.sleep(0.01)
            elapsed = time.perf_counter() - begin
            worker.stop()
            running.join()
    return elapsed
