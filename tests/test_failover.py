"""Worker processes that die or freeze: failover and fencing, on SQLite and PostgreSQL.

Workers are real `python -m declsaga worker` processes, killed with SIGKILL or frozen
with SIGSTOP. Every step of `workersagas.Transfer` records a `start` and an `end` side
effect (a JSON line for SQLite, a row of a PostgreSQL table for PostgreSQL) with its
run's idempotency key and the worker's pid, which is what the checks read.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import attrs
import pytest
from pg import POSTGRES_DSN, fresh_schema
from workersagas import Transfer, create_effects_table, read_effects

from declsaga import Executor, Report
from declsaga.stores import FINAL_STATUSES, Store, from_url

TESTS = Path(__file__).parent
LEASE = 1.0  # seconds: a PostgreSQL worker's lease, short so that takeovers are quick


def with_params(dsn: str, **params: Any) -> str:
    parts = urlsplit(dsn)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit(parts._replace(query=query))


@attrs.define
class Backend:
    kind: str
    url: str  # the store, for workers
    effects: str  # where side effects are recorded
    store: Store  # this process's own store object on the same data


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 's.db'}"
        store = from_url(url)
        try:
            yield Backend("sqlite", url, str(tmp_path / "effects.jsonl"), store)
        finally:
            store.close()
        return
    # The effects table in a schema of its own: a store's schema holds only its tables.
    with fresh_schema() as schema, fresh_schema() as effects_schema:
        effects = f"{POSTGRES_DSN}#{effects_schema}"
        create_effects_table(effects)
        url = with_params(POSTGRES_DSN, schema=schema, lease=LEASE)
        store = from_url(url)
        try:
            yield Backend("postgres", url, effects, store)
        finally:
            store.close()


class Workers:
    """Worker processes on one store; the ones killed, and when they were dead for sure.

    A reader thread per worker collects its output; `start` returns once the worker says
    it has started (before that, SIGTERM would end it before its handler is installed).
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.live: list[subprocess.Popen[str]] = []
        # pid -> when SIGKILL was sent: alive (and holding its sagas) until then at least
        self.killed: dict[int, float] = {}
        self.lines: dict[int, list[str]] = {}
        self.readers: dict[int, threading.Thread] = {}

    def output(self, worker: subprocess.Popen[str]) -> str:
        self.readers[worker.pid].join(30)
        return "".join(self.lines[worker.pid])

    def _read(self, worker: subprocess.Popen[str], started: threading.Event) -> None:
        assert worker.stdout is not None
        with worker.stdout:  # closed at the end of the output: the worker has exited
            for line in worker.stdout:
                self.lines[worker.pid].append(line)
                if "Worker started on" in line:
                    started.set()

    def start(self, concurrency: int = 3) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "DECLSAGA_EFFECTS": self.backend.effects,
            "PYTHONPATH": str(TESTS),
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "declsaga", "worker", "--store", self.backend.url,
             "--import", "workersagas", "--concurrency", str(concurrency),
             "--poll-interval", "0.05", "--grace", "10"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.live.append(worker)
        self.lines[worker.pid] = []
        started = threading.Event()
        reader = threading.Thread(target=self._read, args=(worker, started), daemon=True)
        reader.start()
        self.readers[worker.pid] = reader
        if not started.wait(30):
            raise AssertionError(f"The worker did not start: {''.join(self.lines[worker.pid])}")
        return worker

    def kill(self, worker: subprocess.Popen[str]) -> None:
        self.killed[worker.pid] = time.time()
        worker.kill()
        worker.wait(30)
        self.readers[worker.pid].join(30)
        self.live.remove(worker)

    def stop_all(self) -> None:
        for worker in self.live:
            worker.send_signal(signal.SIGCONT)  # in case a test left it frozen
            worker.send_signal(signal.SIGTERM)
        for worker in self.live:
            worker.wait(60)
            output = self.output(worker)
            assert worker.returncode == 0, output
        self.live = []


@pytest.fixture
def workers(backend: Backend) -> Iterator[Workers]:
    started = Workers(backend)
    try:
        yield started
    finally:
        for worker in started.live:
            worker.kill()
            worker.wait(30)
        for reader in started.readers.values():
            reader.join(30)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout}s waiting until {what}.")
        time.sleep(0.02)


@attrs.define
class Attempt:
    """One execution of a run by one process: from its `start` to its `end`, or, for a
    process killed in it, to when the signal was sent (the earliest it can have died: a
    successor starting before that would have overlapped it)."""

    key: str
    saga: str
    pid: int
    start: float
    end: float | None


def attempts_of(effects: list[dict[str, Any]]) -> list[Attempt]:
    found: list[Attempt] = []
    open_: dict[tuple[str, int], Attempt] = {}
    for line in effects:
        if line["phase"] == "start":
            attempt = Attempt(line["key"], line["saga"], line["pid"], line["at"], None)
            assert (line["key"], line["pid"]) not in open_, f"one process ran it twice: {line}"
            open_[line["key"], line["pid"]] = attempt
            found.append(attempt)
        else:
            open_.pop((line["key"], line["pid"])).end = line["at"]
    return found


def succeeded_at(store: Store, saga_id: str) -> dict[str, float]:
    """Each run recorded as succeeded in the saga's journal: its key, and when."""
    saga = store.load(saga_id)
    assert saga is not None
    return {
        f"{saga_id}/{entry['run']}": entry["at"]
        for entry in saga.entries
        if isinstance(entry, dict) and entry.get("kind") == "run_succeeded"
    }


def test_failover_under_repeated_sigkill(backend: Backend, workers: Workers) -> None:
    sagas = 300
    executor = Executor(store=backend.store)
    expected = {}
    for n in range(sagas):
        fail = n % 10 == 0
        saga_id = executor.submit(Transfer(amount=n, work_ms=random.randint(10, 60), fail=fail))
        expected[saga_id] = fail
    for _ in range(3):
        workers.start()
    chaos = random.Random(4)
    kills = 0
    while backend.store.unfinished() and kills < 8:
        time.sleep(chaos.uniform(0.2, 0.6))
        workers.kill(chaos.choice(workers.live))
        kills += 1
        workers.start()
    wait_until(lambda: not backend.store.unfinished(), 180, "every saga has ended")
    workers.stop_all()
    assert kills >= 3, "the sagas ended before the workers could be killed a few times"

    # Every saga ended as an uninterrupted run would have.
    for saga_id, fail in expected.items():
        record = backend.store.get(saga_id)  # type: ignore[attr-defined]
        assert record.status == ("compensated" if fail else "completed"), saga_id
        trail = ["debit", "credit", "notify"] + (["reverse", "refund"] if fail else [])
        assert record.fields["done"] == trail, saga_id

    attempts = attempts_of(read_effects(backend.effects))
    by_key: dict[str, list[Attempt]] = defaultdict(list)
    by_saga: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in attempts:
        by_key[attempt.key].append(attempt)
        by_saga[attempt.saga].append(attempt)
        if attempt.end is None:  # only a killed process leaves a run without an end
            assert attempt.pid in workers.killed, attempt
            attempt.end = workers.killed[attempt.pid]
    assert set(by_saga) == set(expected)
    repeated = 0
    for saga_id, saga_attempts in by_saga.items():
        success = succeeded_at(backend.store, saga_id)
        for key, runs in by_key.items():
            if not key.startswith(f"{saga_id}/"):
                continue
            # A run executes again only after the process of every earlier attempt died...
            assert all(run.pid in workers.killed for run in runs[:-1]), runs
            repeated += len(runs) - 1
            # ... and never once its success is recorded.
            if key in success:
                assert max(run.start for run in runs) <= success[key], (runs, success[key])
        # One process at a time drives a saga: attempts of different processes never overlap.
        ordered = sorted(saga_attempts, key=lambda attempt: attempt.start)
        for before, after in itertools.pairwise(ordered):
            if before.pid != after.pid:
                assert before.end is not None and before.end <= after.start, (before, after)
    print(f"{kills} kills, {repeated} runs executed again after a crash")


def test_a_frozen_worker_is_fenced_off(backend: Backend, workers: Workers) -> None:
    """SIGSTOP a worker in the middle of a step. On PostgreSQL its lease expires, another
    worker takes the saga over, and the frozen one, resumed, writes nothing more to it.
    On SQLite a frozen process still holds its lock: nobody takes its saga over."""
    executor = Executor(store=backend.store)
    executor.submit(Transfer(amount=1, debit_ms=2500), saga_id="fenced")
    frozen = workers.start(concurrency=1)

    def started_by(pid: int) -> bool:
        return any(
            line["pid"] == pid and line["action"] == "debit"
            for line in read_effects(backend.effects)
        )

    wait_until(lambda: started_by(frozen.pid), 30, "the first worker starts debit")
    frozen.send_signal(signal.SIGSTOP)
    taker = workers.start(concurrency=1)
    if backend.kind == "sqlite":
        time.sleep(LEASE + 1.5)
        assert not started_by(taker.pid)  # a live (if frozen) process keeps its saga
        frozen.send_signal(signal.SIGCONT)
        report = executor.wait("fenced", timeout=30)
        assert not started_by(taker.pid)
        assert [run.action for run in report.runs] == ["debit", "credit", "notify"]
        workers.stop_all()
        return
    report = executor.wait("fenced", timeout=60)
    assert [run.action for run in report.runs] == ["debit", "credit", "notify"]
    assert started_by(taker.pid)
    taken_over = backend.store.load("fenced")
    frozen.send_signal(signal.SIGCONT)

    def debit_ended_by_frozen() -> bool:
        return any(
            line["pid"] == frozen.pid and line["phase"] == "end"
            for line in read_effects(backend.effects)
        )

    wait_until(debit_ended_by_frozen, 30, "the resumed worker finishes its step")
    time.sleep(0.5)  # time for it to try its commit, and be refused
    assert backend.store.load("fenced") == taken_over  # it wrote nothing more
    workers.stop_all()
    output = workers.output(frozen)
    assert "Saga 'fenced' abandoned:" in output, output
    assert "lease" in output, output
    effects_of_frozen = [
        (line["action"], line["phase"])
        for line in read_effects(backend.effects)
        if line["pid"] == frozen.pid
    ]
    assert effects_of_frozen == [("debit", "start"), ("debit", "end")]  # nothing after


def test_an_unreachable_server_is_retried_without_showing_the_password(tmp_path: Path) -> None:
    url = "postgresql://postgres:s3cret-pw@127.0.0.1:1/test?schema=nowhere"
    worker = subprocess.Popen(
        [sys.executable, "-m", "declsaga", "worker", "--store", url, "--import", "workersagas"],
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(2.0)
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=30)[0]
    assert worker.returncode == 0, output
    assert "s3cret-pw" not in output
    retries = output.count(
        "Cannot open the store postgresql://postgres:***@127.0.0.1:1/test?schema=nowhere "
        "(retrying in"
    )
    assert retries >= 2, output


def test_wait_is_woken_by_a_worker_s_commit(backend: Backend, workers: Workers) -> None:
    executor = Executor(store=backend.store)
    saga_id = executor.submit(Transfer(amount=7))
    workers.start(concurrency=1)
    report: Report = executor.wait(saga_id, timeout=60)
    assert [run.action for run in report.runs] == ["debit", "credit", "notify"]
    saga = backend.store.load(saga_id)
    assert saga is not None and saga.status in FINAL_STATUSES
    workers.stop_all()
