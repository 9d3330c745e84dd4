"""Operator actions on stored sagas: cancel, retry a failed rollback, resolve by hand.

Each runs on every store (the `store` fixture), and across processes: on one SQLite
file from a real child process, and from another store object on the same data.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import declsaga
from declsaga import (
    CompensationFailed,
    Context,
    Executor,
    PostgresStore,
    SagaBusy,
    SQLiteStore,
    UsageError,
)
from declsaga.policies import SagaCancelled
from declsaga.stores import Store


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def another(store: Store) -> Store:
    """Another store object on the same data, as another process would open."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    if isinstance(store, PostgresStore):
        from pg import POSTGRES_DSN  # noqa: PLC0415

        return PostgresStore(POSTGRES_DSN, schema=store.schema)
    return store  # the memory store lives in this process only


class Steps:
    """Three steps and their undos, logging what runs; `hold` makes step 2 wait for a
    gate, `fail_undo` makes the first undo of step 1 fail."""

    def __init__(self, name: str) -> None:
        self.log: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.hold = False
        self.fail_undo = 0
        self.setup = declsaga.new(
            {
                "s1": self.step("s1"),
                "s2": self.held,
                "s3": self.step("s3", fail=True),
                "u1": self.undo_1,
                "u2": self.step("u2"),
            },
            sequence=["s1", "s2", "s3"],
            compensators={"s1": "u1", "s2": "u2"},
            name=name,
        )

    def step(self, name: str, *, fail: bool = False) -> Any:
        def run(ctx: Context) -> None:
            self.log.append(name)
            if fail and not self.hold:
                raise RuntimeError(f"{name} failed")

        return run

    def held(self, ctx: Context) -> None:
        self.log.append("s2")
        if self.hold:
            self.entered.set()
            assert self.gate.wait(30)

    def undo_1(self, ctx: Context) -> None:
        self.log.append("u1")
        if self.fail_undo:
            self.fail_undo -= 1
            raise ValueError("the refund service said no")


COUNTER = iter(range(10**6))


@pytest.fixture
def steps() -> Steps:
    return Steps(f"tests.operations.{next(COUNTER)}")


def failed_saga(store: Store, steps: Steps, saga_id: str) -> None:
    steps.fail_undo = 1
    with pytest.raises(CompensationFailed):
        Executor(store=store).execute(steps.setup, saga_id=saga_id)
    saga = store.load(saga_id)
    assert saga is not None and saga.status == "failed"
    assert steps.log == ["s1", "s2", "s3", "u2", "u1"]
    steps.log.clear()


# -- cancel -------------------------------------------------------------------------------


def test_cancel_stops_a_running_saga_at_its_next_transition(store: Store, steps: Steps) -> None:
    steps.hold = True
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            Executor(store=store).execute(steps.setup, saga_id="c-1")
        except BaseException as error:
            outcome.append(error)

    runner = threading.Thread(target=run)
    runner.start()
    assert steps.entered.wait(10)
    operator = another(store)
    try:
        assert Executor(store=operator).cancel("c-1") is True
    finally:
        if operator is not store:
            operator.close()
    steps.gate.set()
    runner.join(10)
    [error] = outcome
    assert type(error) is SagaCancelled
    assert str(error) == "Saga 'c-1' was cancelled."
    assert steps.log == ["s1", "s2", "u2", "u1"]  # s3 never ran; s2 finished, then undone
    record = store.get("c-1")  # type: ignore[attr-defined]
    assert record.status == "compensated"
    assert [(run.action, type(run.error).__name__) for run in record.report.runs] == [
        ("s1", "NoneType"),
        ("s2", "NoneType"),
        ("s3", "SagaCancelled"),
        ("u2", "NoneType"),
        ("u1", "NoneType"),
    ]


def test_a_cancelled_pending_saga_rolls_back_without_running(store: Store, steps: Steps) -> None:
    executor = Executor(store=store)
    executor.submit(steps.setup, saga_id="c-1")
    assert executor.cancel("c-1") is True
    [recovered] = executor.recover()
    assert (recovered.status, type(recovered.error)) == ("compensated", SagaCancelled)
    assert steps.log == []
    with pytest.raises(SagaCancelled):
        executor.wait("c-1", timeout=0)


def test_cancel_of_what_cannot_be_cancelled(store: Store, steps: Steps) -> None:
    executor = Executor(store=store)
    assert executor.cancel("nobody") is False
    steps.hold = False
    with pytest.raises(RuntimeError):
        executor.execute(steps.setup, saga_id="ended")
    assert executor.cancel("ended") is False


CHILD = """
import os, sys, time
import declsaga

def wait_for_gate(ctx):
    print("entered", flush=True)
    while not os.path.exists({gate!r}):
        time.sleep(0.01)

setup = declsaga.new(
    {{"s1": lambda ctx: None, "s2": wait_for_gate, "s3": lambda ctx: None,
      "u1": lambda ctx: print("undo s1", flush=True)}},
    sequence=["s1", "s2", "s3"], compensators={{"s1": "u1"}}, name="tests.operations.child",
)
try:
    declsaga.Executor(store=declsaga.SQLiteStore({db!r})).execute(setup, saga_id="x-1")
except declsaga.policies.SagaCancelled as error:
    print(error, flush=True)
    sys.exit(3)
"""


def test_cancel_from_another_process(tmp_path: Path) -> None:
    db, gate = str(tmp_path / "s.db"), str(tmp_path / "gate")
    child = subprocess.Popen(
        [sys.executable, "-c", "import declsaga.policies\n" + CHILD.format(db=db, gate=gate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "entered"
    with SQLiteStore(db) as store:
        assert Executor(store=store).cancel("x-1") is True
        Path(gate).touch()
        output = child.communicate(timeout=30)[0]
        assert child.returncode == 3, output
        assert output.split("\n")[:2] == ["undo s1", "Saga 'x-1' was cancelled."]
        saga = store.load("x-1")
        assert saga is not None and saga.status == "compensated"


# -- retry and resolve ----------------------------------------------------------------------


def test_retry_continues_a_failed_rollback_from_its_failed_compensation(
    store: Store, steps: Steps
) -> None:
    failed_saga(store, steps, "r-1")
    operator = another(store)
    try:
        with pytest.raises(RuntimeError, match="s3 failed"):  # the saga's own error, now
            Executor(store=operator).retry("r-1")
    finally:
        if operator is not store:
            operator.close()
    assert steps.log == ["u1"]  # only the failed compensation runs again; u2 is not repeated
    record = store.get("r-1")  # type: ignore[attr-defined]
    assert record.status == "compensated"
    kinds = [entry["kind"] for entry in record.journal]
    assert kinds.count("rollback_retried") == 1
    assert [run.action for run in record.report.runs] == ["s1", "s2", "s3", "u2", "u1", "u1"]


def test_a_retry_that_fails_again_leaves_the_saga_failed(store: Store, steps: Steps) -> None:
    failed_saga(store, steps, "r-1")
    steps.fail_undo = 1
    with pytest.raises(CompensationFailed):
        Executor(store=store).retry("r-1")
    saga = store.load("r-1")
    assert saga is not None and saga.status == "failed"
    steps.fail_undo = 0
    with pytest.raises(RuntimeError):
        Executor(store=store).retry("r-1")
    assert steps.log == ["u1", "u1"]


def test_resolve_marks_a_failed_saga_resolved_with_its_reason(store: Store, steps: Steps) -> None:
    failed_saga(store, steps, "v-1")
    Executor(store=store).resolve("v-1", "refunded by hand, ticket 42")
    record = store.get("v-1")  # type: ignore[attr-defined]
    assert record.status == "resolved"
    assert record.journal[-1]["reason"] == "refunded by hand, ticket 42"
    assert steps.log == []
    # Its outcome from now on: the report, nothing raised, nothing run.
    report = Executor(store=store).execute(steps.setup, saga_id="v-1")
    assert report.error is None
    assert Executor(store=store).wait("v-1").error is None
    assert store.unfinished() == []


@pytest.mark.parametrize("operation", ["retry", "resolve"])
def test_only_a_failed_saga_can_be_retried_or_resolved(
    store: Store, steps: Steps, operation: str
) -> None:
    executor = Executor(store=store)
    done = "retried" if operation == "retry" else "resolved"
    args: tuple[Any, ...] = () if operation == "retry" else ("a reason",)
    with pytest.raises(RuntimeError):
        executor.execute(steps.setup, saga_id="ok")
    with pytest.raises(
        UsageError,
        match=exactly(f"Saga 'ok' is compensated: only a failed saga can be {done}."),
    ):
        getattr(executor, operation)("ok", *args)
    with pytest.raises(
        UsageError, match=exactly(f"Saga 'nobody' is not in {store!r}: submit or execute it first.")
    ):
        getattr(executor, operation)("nobody", *args)


def test_retry_of_a_saga_someone_drives_is_busy(store: Store, steps: Steps) -> None:
    failed_saga(store, steps, "r-1")
    claim = store.claim("r-1")
    assert claim is not None
    try:
        with pytest.raises(SagaBusy):
            Executor(store=store).retry("r-1")
    finally:
        store.release(claim)


@pytest.mark.parametrize("reason", ["", "  ", None, 3])
def test_resolve_needs_a_reason(store: Store, reason: Any) -> None:
    with pytest.raises(UsageError, match=r"^resolve\(\) needs a reason, a non-empty string, got "):
        Executor(store=store).resolve("v-1", reason)


@pytest.mark.parametrize("operation", ["cancel", "retry", "resolve"])
def test_operations_need_a_store(operation: str) -> None:
    args: tuple[Any, ...] = ("x",) if operation != "resolve" else ("x", "reason")
    with pytest.raises(
        UsageError,
        match=exactly(f"{operation}() needs an executor with a store: Executor(store=...)."),
    ):
        getattr(Executor(), operation)(*args)


OPERATOR = """
import sys
import declsaga

undone = []
setup = declsaga.new(
    {{"s1": lambda ctx: None, "s2": lambda ctx: None, "s3": lambda ctx: None,
      "u1": lambda ctx: print("u1 ran", flush=True), "u2": lambda ctx: None}},
    sequence=["s1", "s2", "s3"], compensators={{"s1": "u1", "s2": "u2"}}, name={name!r},
)
executor = declsaga.Executor(store=declsaga.SQLiteStore({db!r}))
if sys.argv[1] == "retry":
    try:
        executor.retry("r-1")
    except RuntimeError as error:
        print("raised", error, flush=True)
else:
    executor.resolve("r-2", "fixed in the ledger")
    print("resolved", flush=True)
"""


@pytest.mark.parametrize("operation", ["retry", "resolve"])
def test_retry_and_resolve_from_another_process(
    tmp_path: Path, steps: Steps, operation: str
) -> None:
    db = str(tmp_path / "s.db")
    saga_id = "r-1" if operation == "retry" else "r-2"
    with SQLiteStore(db) as store:
        failed_saga(store, steps, saga_id)
    script = OPERATOR.format(name=steps.setup.name, db=db)  # type: ignore[attr-defined]
    done = subprocess.run(
        [sys.executable, "-c", script, operation],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if operation == "retry":
        assert done.stdout.split("\n")[:2] == ["u1 ran", "raised s3 failed"]
    else:
        assert done.stdout.strip() == "resolved"
    with SQLiteStore(db) as store:
        saga = store.load(saga_id)
        assert saga is not None
        assert saga.status == ("compensated" if operation == "retry" else "resolved")


def test_a_cancelled_saga_starts_no_member_of_a_parallel_group(store: Store) -> None:
    ran: list[str] = []

    def member(name: str) -> Any:
        return lambda ctx: ran.append(name)

    def a(ctx: Context) -> None:
        ran.append("a")
        assert operator.cancel(ctx.saga_id)  # an operator, while step a runs

    setup = declsaga.new(
        {"a": a, "undo-a": member("undo-a"), "b": member("b"), "c": member("c")},
        sequence=["a", "b", "c"],
        compensators={"a": "undo-a"},
        parallel=[("b", "c")],
        name=f"tests.operations.group.{next(COUNTER)}",
    )
    operator = Executor(store=store)
    with pytest.raises(SagaCancelled):
        Executor(store=store).execute(setup, saga_id="g-1")
    assert ran == ["a", "undo-a"]  # the group's start was refused: neither b nor c ran
    record = store.get("g-1")  # type: ignore[attr-defined]
    assert record.status == "compensated"
    assert sorted((run.action, type(run.error).__name__) for run in record.report.runs) == [
        ("a", "NoneType"),
        ("b", "SagaCancelled"),
        ("c", "SagaCancelled"),
        ("undo-a", "NoneType"),
    ]
