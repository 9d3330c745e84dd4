"""`Worker` and `python -m declsaga worker` on the embedded stores.

In-process tests run a worker on a thread; the command-line tests start real worker
processes on one SQLite file. The multi-worker failover and fencing tests, on SQLite and
PostgreSQL, are in test_failover.py.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from delegates import Delegate
from workersagas import ENTERED, GATES, Flaky, Held, Transfer, read_effects

import declsaga
from declsaga import Context, Executor, Saga, SQLiteStore, StoreError, UsageError, compensates, step
from declsaga.policies import Retry, SagaCancelled
from declsaga.stores import Claim, Commit, MemoryStore, SagaHeader, Store
from declsaga.worker import Worker

TESTS = Path(__file__).parent


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.fixture
def effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.jsonl"
    monkeypatch.setenv("DECLSAGA_EFFECTS", str(path))
    return path


class Running:
    """A worker running on a thread of this process."""

    def __init__(self, worker: Worker, grace: float = 10.0) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, kwargs={"grace": grace})
        self.thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        self.worker.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def test_a_worker_runs_submitted_sagas_each_once(store: Store, effects: Path) -> None:
    executor = Executor(store=store)
    ids = [executor.submit(Transfer(amount=n, fail=n % 5 == 0)) for n in range(20)]
    running = Running(Worker(executor, concurrency=3, poll_interval=0.01))
    try:
        for n, saga_id in enumerate(ids):
            if n % 5 == 0:
                with pytest.raises(RuntimeError, match=f"cannot notify about {n}"):
                    executor.wait(saga_id, timeout=20)
            else:
                executor.wait(saga_id, timeout=20)
    finally:
        running.stop()
    assert store.unfinished() == []
    assert {saga.status for saga in store.sagas()} == {"completed", "compensated"}
    ends = [line["key"] for line in read_effects(effects) if line["phase"] == "end"]
    assert len(ends) == len(set(ends)) == 16 * 3 + 4 * 5  # every run exactly once
    for saga_id in ids:  # released: nobody holds them any more
        claim = store.claim(saga_id)
        assert claim is not None
        store.release(claim)


def test_a_worker_also_takes_over_unfinished_sagas(store: Store) -> None:
    # A saga left running (as by a dead process): its first step recorded as succeeded.
    executor = Executor(store=store)
    GATES["left-1"] = threading.Event()
    ENTERED["left-1"] = threading.Event()
    first = Running(Worker(executor, concurrency=1, poll_interval=0.01))
    executor.submit(Held(), saga_id="left-1")
    assert ENTERED["left-1"].wait(10)
    first.worker.stop()  # leaves it at the next step boundary, once `hold` ends
    GATES["left-1"].set()
    first.thread.join(10)
    saga = store.load("left-1")
    assert saga is not None and saga.status == "running"
    started = [entry["action"] for entry in saga.entries if entry.get("kind") == "run_started"]
    assert started == ["first", "hold"]  # `last` not started: left at the boundary
    second = Running(Worker(executor, concurrency=1, poll_interval=0.01))
    try:
        report = executor.wait("left-1", timeout=10)
    finally:
        second.stop()
    assert [run.action for run in report.runs] == ["first", "hold", "last"]
    record = store.get("left-1")  # type: ignore[attr-defined]
    assert record.fields["done"] == ["first", "hold", "last"]  # nothing ran twice


def test_stop_releases_claims_after_the_grace_period(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    executor = Executor(store=store)
    GATES["stuck-1"] = threading.Event()
    ENTERED["stuck-1"] = threading.Event()
    executor.submit(Held(), saga_id="stuck-1")
    running = Running(Worker(executor, concurrency=1, poll_interval=0.01), grace=0.2)
    try:
        assert ENTERED["stuck-1"].wait(10)
        assert running.worker.running == ["stuck-1"]
        with caplog.at_level(logging.WARNING, logger="declsaga.worker"):
            begin = time.monotonic()
            running.worker.stop()
            running.thread.join(10)
            assert 0.2 <= time.monotonic() - begin < 5
        assert "releasing the claims of 1 saga(s) still in a step: stuck-1" in caplog.text
        claim = store.claim("stuck-1")  # released although its step still runs
        assert claim is not None
        store.release(claim)
    finally:
        GATES["stuck-1"].set()
    # The abandoned step finds its claim gone at its next commit and writes nothing.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "stuck-1" in running.worker.running:
        time.sleep(0.01)
    saga = store.load("stuck-1")
    assert saga is not None and saga.status == "running"
    assert [
        entry.get("action") for entry in saga.entries if entry.get("kind") == "run_started"
    ] == [
        "first",
        "hold",
    ]


def test_a_saga_of_an_unknown_definition_is_held_back_then_offered_again(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # As if submitted by a process that knows a definition this worker never imported.
    claim = store.claim("gone-1")
    assert claim is not None
    header = SagaHeader("gone-1", "tests.nowhere.Gone", "f-1", {"sequence": ["a"]}, None)
    store.append(claim, Commit(0, (), "pending", header))
    store.release(claim)
    executor = Executor(store=store)
    executor.submit(Transfer(amount=2), saga_id="known-2")
    with caplog.at_level(logging.WARNING, logger="declsaga"):
        running = Running(Worker(executor, concurrency=1, poll_interval=0.01, retry_refused=0.3))
        try:
            executor.wait("known-2", timeout=10)  # not stuck behind the refused one
            assert store.claim("gone-1") is None  # held back by the worker
            deadline = time.monotonic() + 10
            refusals = 0
            while refusals < 2 and time.monotonic() < deadline:  # offered again, refused again
                refusals = caplog.text.count("'tests.nowhere.Gone', which is not registered")
                time.sleep(0.01)
            assert refusals >= 2
        finally:
            running.stop()
    claim = store.claim("gone-1")  # released when the worker stopped
    assert claim is not None
    saga = store.load("gone-1")
    assert saga is not None and (saga.status, saga.seq) == ("pending", 1)  # untouched


def test_a_worker_parks_a_saga_that_waits_for_a_retry(
    store: Store, effects: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor = Executor(store=store)
    executor.submit(Flaky(), saga_id="p-1")
    with caplog.at_level(logging.INFO, logger="declsaga.worker"):
        running = Running(Worker(executor, concurrency=1, poll_interval=0.05))
        try:
            deadline = time.monotonic() + 10
            while "parked" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            # Parked: the worker holds it no more, and nothing waits in a thread for it.
            assert running.worker.running == []
            saga = store.load("p-1")
            assert saga is not None and saga.status == "running"
            assert [e["kind"] for e in saga.entries][-1] == "attempt_failed"
            report = executor.wait("p-1", timeout=10)
        finally:
            running.stop()
    assert "Saga 'p-1' parked: its next attempt is due in 0." in caplog.text
    assert [run.action for run in report.runs] == ["call"]
    record = store.get("p-1")  # type: ignore[attr-defined]
    assert record.fields["attempts"] == [2]
    assert [line["phase"] for line in read_effects(effects)] == ["attempt 1", "attempt 2"]


class FailingStore(Delegate):
    """Delegates to a store, but its first `failures` calls of claim_next fail."""

    def __init__(self, inner: Store, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    def claim_next(self, limit: int) -> list[Claim]:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError("The database is down.")
        return self.inner.claim_next(limit)


def test_a_failing_store_is_retried_with_backoff(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    failing = FailingStore(store, failures=3)
    executor = Executor(store=failing)
    executor.submit(Transfer(), saga_id="t-1")
    with caplog.at_level(logging.WARNING, logger="declsaga.worker"):
        running = Running(Worker(executor, concurrency=1, poll_interval=0.01))
        try:
            executor.wait("t-1", timeout=10)
        finally:
            running.stop()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == [
        "The store failed (retrying in 0.0s): The database is down.",
        "The store failed (retrying in 0.0s): The database is down.",
        "The store failed (retrying in 0.1s): The database is down.",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be an int above 0, got 0."),
        ({"concurrency": 1.5}, "concurrency must be an int above 0, got 1.5."),
        ({"poll_interval": -1}, "poll_interval must be a number of seconds above 0, got -1."),
        (
            {"retry_refused": float("nan")},
            "retry_refused must be a number of seconds above 0, got nan.",
        ),
    ],
)
def test_bad_worker_options(store: Store, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        Worker(Executor(store=store), **options)


def test_a_worker_needs_an_executor_with_a_store() -> None:
    with pytest.raises(
        UsageError, match=exactly("A Worker needs an executor with a store: Executor(store=...).")
    ):
        Worker(Executor())
    with pytest.raises(UsageError, match=r"^A Worker runs an Executor, got "):
        Worker(MemoryStore())  # type: ignore[arg-type]


def test_a_worker_runs_once(store: Store) -> None:
    worker = Worker(Executor(store=store), poll_interval=0.01)
    worker.stop()
    worker.run(grace=1)
    with pytest.raises(UsageError, match="runs once"):
        worker.run()


# -- the command line -----------------------------------------------------------------------


def start_worker(url: str, effects: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DECLSAGA_EFFECTS": str(effects), "PYTHONPATH": str(TESTS)}
    return subprocess.Popen(
        [sys.executable, "-m", "declsaga", "worker", "--store", url, "--import", "workersagas",
         "--poll-interval", "0.02", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def test_worker_processes_run_sagas_and_stop_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    effects = tmp_path / "effects.jsonl"
    with SQLiteStore(db) as store:
        executor = Executor(store=store)
        ids = [executor.submit(Transfer(amount=n, work_ms=5)) for n in range(30)]
        workers = [start_worker(f"sqlite:///{db}", effects, "--concurrency", "2") for _ in range(2)]
        try:
            for saga_id in ids:
                executor.wait(saga_id, timeout=60)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            outputs = [worker.communicate(timeout=30)[0] for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], outputs
        assert all("Worker stopped." in output for output in outputs), outputs
        assert all("Worker started on SQLiteStore(" in output for output in outputs)
    lines = read_effects(effects)
    ends = [line["key"] for line in lines if line["phase"] == "end"]
    assert len(ends) == len(set(ends)) == 30 * 3
    assert len({line["pid"] for line in lines}) == 2  # both workers took a share


def test_a_killed_worker_process_s_saga_is_taken_over_at_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    effects = tmp_path / "effects.jsonl"
    with SQLiteStore(db) as store:
        executor = Executor(store=store)
        executor.submit(Transfer(amount=1, work_ms=400), saga_id="slow-1")
        first = start_worker(f"sqlite:///{db}", effects)
        deadline = time.monotonic() + 30
        while not read_effects(effects) and time.monotonic() < deadline:
            time.sleep(0.01)
        first.kill()  # in the middle of `debit`
        first.communicate(timeout=10)
        second = start_worker(f"sqlite:///{db}", effects)
        try:
            report = executor.wait("slow-1", timeout=30)
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=30)
    assert [run.action for run in report.runs] == ["debit", "credit", "notify"]
    debit = [line for line in read_effects(effects) if line["action"] == "debit"]
    assert [(line["phase"], line["pid"]) for line in debit] == [
        ("start", first.pid),
        ("start", second.pid),
        ("end", second.pid),
    ]
    assert len({line["key"] for line in debit}) == 1  # the same run, the same key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--store", "mysql://x/y"], "names no store"),
        (["--store", "sqlite://"], "names no file"),
        (["--store", "sqlite:///x.db", "--import", "no_such_module_here"], "cannot import"),
    ],
)
def test_the_command_line_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    if "--import" not in args:
        args = [*args, "--import", "workersagas"]
    done = subprocess.run(
        [sys.executable, "-m", "declsaga", "worker", *args],
        check=False,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr


OPERATOR: list[Executor] = []


class CancelledWhileFlaky(Saga, name="tests.workers.CancelledWhileFlaky"):
    """Its step is cancelled by an operator during its first attempt, which then fails:
    the retry that would park the saga meets the cancel instead."""

    undone: bool = False

    @step(order=1)
    def first(self, ctx: Context) -> None:
        return None

    @compensates("first")
    def undo_first(self, ctx: Context) -> None:
        self.undone = True

    @step(order=2, retry=Retry(attempts=3, backoff=5.0, jitter=0, on=(ConnectionError,)))
    def call(self, ctx: Context) -> None:
        assert OPERATOR[0].cancel(ctx.saga_id)
        raise ConnectionError("down")


def test_a_cancel_met_while_parking_rolls_the_saga_back(store: Store) -> None:
    executor = Executor(store=store)
    OPERATOR[:] = [executor]
    executor.submit(CancelledWhileFlaky(), saga_id="cp-1")
    running = Running(Worker(executor, concurrency=1, poll_interval=0.05))
    try:
        with pytest.raises(SagaCancelled):
            executor.wait("cp-1", timeout=10)
    finally:
        running.stop()
    record = store.get("cp-1")  # type: ignore[attr-defined]
    assert (record.status, record.fields["undone"]) == ("compensated", True)
    kinds = [entry["kind"] for entry in record.journal]
    assert kinds.count("attempt_failed") == 1  # recorded with the rollback, not parked


def test_a_stopping_worker_leaves_a_saga_before_its_parallel_group(store: Store) -> None:
    entered, gate = threading.Event(), threading.Event()
    ran: list[str] = []

    def first(ctx: Context) -> None:
        entered.set()
        assert gate.wait(10)
        ran.append("first")

    setup = declsaga.new(
        {"first": first, "b": lambda ctx: ran.append("b"), "c": lambda ctx: ran.append("c")},
        sequence=["first", "b", "c"],
        parallel=[("b", "c")],
        name="tests.workers.group-boundary",
    )
    executor = Executor(store=store)
    executor.submit(setup, saga_id="gb-1")
    running = Running(Worker(executor, concurrency=1, poll_interval=0.01))
    assert entered.wait(10)
    running.worker.stop()
    gate.set()
    running.thread.join(10)
    assert ran == ["first"]  # left at the boundary: the group did not start
    saga = store.load("gb-1")
    assert saga is not None and saga.status == "running"
    started = [e["action"] for e in saga.entries if e.get("kind") == "run_started"]
    assert started == ["first"]
    [recovered] = executor.recover()  # another process takes it from there
    assert recovered.status == "completed"
    assert sorted(ran) == ["b", "c", "first"]
