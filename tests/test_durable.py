"""Durable execution (SPEC section 8), end to end, against every store.

Each test runs against the memory store and a SQLite file (the `store` fixture), most
also through `execute` and `execute_async` (the `run` fixture). A crash is simulated
without killing the process: a delegating store fails its k-th append with `StoreError`,
which stops the execution exactly where a dead process would have stopped (nothing of
that commit lands, or, with `landed=True`, the commit lands and nothing after it). One
test kills a real child process.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import durablesagas
import pytest
from delegates import CRASH, Counting, Crashing, Delegate
from durablesagas import LOG, CardDeclined, OutOfStock, PlaceOrder, Trip
from pg import POSTGRES_DSN

import declsaga
from declsaga import (
    ActionRun,
    CompensationFailed,
    Context,
    DefinitionError,
    EncodeError,
    Executor,
    RecordedError,
    Recovered,
    Report,
    Saga,
    SagaBusy,
    SagaError,
    Setup,
    SQLiteStore,
    StoreError,
    UsageError,
    compensates,
    step,
)
from declsaga._durable import identify
from declsaga._errors import STORABLE
from declsaga._reading import SagaRecord, record_of
from declsaga.inspection import plan
from declsaga.stores import Claim, Commit, MemoryStore, SagaHeader, Store, StoredSaga
from declsaga.stores._postgres import PostgresStore

if TYPE_CHECKING:
    from conftest import Run

pytestmark = pytest.mark.usefixtures("no_async_leaks")

JSONEntry = dict[str, Any]


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def names(runs: Sequence[ActionRun]) -> list[str]:
    return [run.action for run in runs]


def errors(runs: Sequence[ActionRun]) -> list[tuple[str, str, str] | None]:
    return [
        None if run.error is None else (run.action, type(run.error).__name__, str(run.error))
        for run in runs
    ]


def kinds(entries: Sequence[JSONEntry]) -> list[str]:
    return [entry["kind"] for entry in entries]


def loaded(store: Store, saga_id: str) -> StoredSaga:
    stored = store.load(saga_id)
    assert stored is not None, f"saga {saga_id!r} is not stored"
    return stored


def readable(store: Store) -> MemoryStore | SQLiteStore | PostgresStore:
    assert isinstance(store, MemoryStore | SQLiteStore | PostgresStore)
    return store


def read(store: Store, saga_id: str) -> SagaRecord:
    """A stored saga, decoded (SPEC section 8, "Reading sagas")."""
    record = readable(store).get(saga_id)
    assert record is not None, f"saga {saga_id!r} is not stored"
    return record


def runs_of(record: SagaRecord) -> tuple[ActionRun, ...]:
    assert record.report is not None, f"saga {record.saga_id!r} has not started"
    return record.report.runs


def listed(store: Store, status: str | None = None) -> list[SagaRecord]:
    return readable(store).list(status=status)


def keys_finished(stored: StoredSaga) -> set[str]:
    """The idempotency keys of the runs whose outcome the journal holds."""
    saga_id = stored.header.saga_id
    return {
        f"{saga_id}/{entry['run']}"
        for entry in stored.entries
        if entry["kind"] in ("run_succeeded", "run_failed")
    }


# -- stores -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_log() -> Iterator[None]:
    LOG.clear()
    yield
    LOG.clear()


def blocking(executor: Executor, setup: Setup, *, saga_id: str | None = None) -> Report:
    return executor.execute(setup, saga_id=saga_id)


def crash(
    store: Store,
    at: int,
    run: Callable[..., Report],
    setup: Setup,
    saga_id: str,
    **options: Any,
) -> None:
    """Execute `setup` until its `at`-th commit, where the process 'dies'."""
    with pytest.raises(StoreError, match=exactly(CRASH)):
        run(Executor(store=Crashing(store, at), **options), setup, saga_id=saga_id)


class Recover(Protocol):
    mode: str

    def __call__(self, executor: Executor) -> list[Recovered]: ...


class _Recover:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, executor: Executor) -> list[Recovered]:
        if self.mode == "recover":
            return executor.recover()
        return asyncio.run(executor.recover_async())


@pytest.fixture(params=["recover", "recover_async"])
def recover(request: pytest.FixtureRequest) -> Recover:
    return _Recover(request.param)


def logging_setup(name: str, actions: Sequence[str], **options: Any) -> Setup:
    """A named new() setup whose actions log `name key` and return their key."""

    def make(action: str) -> Callable[[Context], str]:
        def fn(ctx: Context) -> str:
            LOG.append(f"{action} {ctx.idempotency_key}")
            return ctx.idempotency_key

        return fn

    return declsaga.new({action: make(action) for action in actions}, name=name, **options)


# -- definitions --------------------------------------------------------------------------


def test_saga_instances_and_named_setups_run_durably(store: Store, run: Run) -> None:
    executor = Executor(store=store)
    order = PlaceOrder(order_id="o-1", amount=30)
    report = run(executor, order, saga_id="order-o-1")
    assert names(report.runs) == ["reserve", "charge", "ship"]
    assert LOG == ["reserve order-o-1/0", "charge order-o-1/1", "ship order-o-1/2"]
    assert (order.reserved, order.charged) == (True, 30)

    setup = logging_setup("durable.two-steps", ["a", "b"], sequence=["a", "b"])
    report = run(executor, setup, saga_id="setup-1")
    assert names(report.runs) == ["a", "b"]
    assert [(record.saga_id, record.name, record.status) for record in listed(store)] == [
        ("order-o-1", "durablesagas.place-order", "completed"),
        ("setup-1", "durable.two-steps", "completed"),
    ]


class HandMade:
    """A Setup that is neither a Saga nor built by new()."""

    def sequence(self) -> list[str]:
        return ["a"]

    def compensator(self, name: str) -> str | None:
        return None

    def action(self, name: str) -> declsaga.Action | None:
        return declsaga.Action("a", lambda ctx: None) if name == "a" else None

    def __repr__(self) -> str:
        return "<HandMade>"


@pytest.mark.parametrize("kind", ["unnamed new()", "hand-made"])
def test_a_setup_that_recovery_cannot_find_again_is_refused(
    store: Store, run: Run, kind: str
) -> None:
    setup: Setup
    if kind == "hand-made":
        setup, described = HandMade(), "<HandMade> (HandMade)"
    else:
        setup = declsaga.new({"a": lambda ctx: LOG.append("a")})
        described = "<setup sequence=['a'] actions=['a'] compensators={}> (FunctionalSetup)"
    with pytest.raises(
        UsageError,
        match=exactly(
            "A durable executor runs Saga instances and setups built with new(..., name=...), "
            f"so that recovery can find them again; got {described}."
        ),
    ):
        run(Executor(store=store), setup, saga_id="s-1")
    assert (LOG, store.sagas()) == ([], [])


def define_parcel() -> type[Saga]:
    """The same class statement each call: a new class under the same default name."""

    class Parcel(Saga):
        weight: int = 1

        @step(order=1)
        def send(self, ctx: Context) -> None:
            LOG.append(f"send {self.weight}")

    return Parcel


def test_a_definition_replaced_under_its_name_is_refused(store: Store, run: Run) -> None:
    first = define_parcel()
    second = define_parcel()
    assert plan(first).name == plan(second).name == f"{__name__}.define_parcel.<locals>.Parcel"
    executor = Executor(store=store)
    with pytest.raises(
        UsageError,
        match=exactly(
            "Parcel(weight=1) (define_parcel.<locals>.Parcel) is no longer the definition "
            f"registered as '{__name__}.define_parcel.<locals>.Parcel': a newer definition "
            "took that name."
        ),
    ):
        run(executor, first(), saga_id="p-1")
    run(executor, second(weight=2), saga_id="p-2")  # the class statement re-run is fine

    old = logging_setup("durable.replaced", ["a"])
    new = logging_setup("durable.replaced", ["a"])  # the same shape: replaces it silently
    with pytest.raises(
        UsageError,
        match=exactly(
            "<setup sequence=['a'] actions=['a'] compensators={}> (FunctionalSetup) is no "
            "longer the definition registered as 'durable.replaced': a newer definition took "
            "that name."
        ),
    ):
        run(executor, old, saga_id="r-1")
    run(executor, new, saga_id="r-2")
    assert LOG == ["send 2", "a r-2/0"]
    assert [record.saga_id for record in listed(store)] == ["p-2", "r-2"]


def define_named(body: str) -> type[Saga]:
    class Named(Saga, name="durable.explicit-name"):
        @step(order=1)
        def send(self, ctx: Context) -> None:
            LOG.append(body)

    return Named


def test_an_explicit_name_taken_by_another_class_is_a_definition_error(store: Store) -> None:
    first = define_named("first")
    again = define_named("again")  # the same class statement, run again: fine
    Executor(store=store).execute(again(), saga_id="n-1")
    assert LOG == ["again"]
    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga test_an_explicit_name_taken_by_another_class_is_a_definition_error.<locals>"
            ".Other: cannot register as 'durable.explicit-name': the name "
            "'durable.explicit-name' is already registered by class "
            f"{__name__}.define_named.<locals>.Named."
        ),
    ):

        class Other(Saga, name="durable.explicit-name"):
            @step(order=1)
            def send(self, ctx: Context) -> None:
                pass

    assert first is not again
    Executor(store=store).execute(again(), saga_id="n-2")  # still the registered one


def test_new_with_another_shape_under_a_taken_name_is_a_usage_error(store: Store) -> None:
    taken = logging_setup("durable.taken", ["a"])
    fingerprint = fingerprint_of(["a"], {}, ["a"])
    other = fingerprint_of(["a", "b"], {}, ["a", "b"])
    with pytest.raises(
        UsageError,
        match=exactly(
            f"new(name='durable.taken') cannot register this setup (fingerprint {other}): the "
            f"name 'durable.taken' is already registered by a setup with fingerprint "
            f"{fingerprint}; give it another name."
        ),
    ):
        logging_setup("durable.taken", ["a", "b"], sequence=["a", "b"])
    Executor(store=store).execute(taken, saga_id="t-1")  # the first one stays registered
    assert LOG == ["a t-1/0"]


def fingerprint_of(
    sequence: Sequence[str], compensators: Mapping[str, str], actions: Sequence[str]
) -> str:
    """The fingerprint of a shape, as a Saga class of that shape reports it."""
    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": "Shape"}
    undoes = {compensator: target for target, compensator in compensators.items()}
    for name in actions:

        def method(self: Saga, ctx: Context) -> None:
            pass

        if name in sequence:
            namespace[name] = step(order=sequence.index(name))(method)
        elif name in undoes:
            namespace[name] = compensates(undoes[name])(method)
        else:
            namespace[name] = declsaga.action(method)
    return plan(type("Shape", (Saga,), namespace)).fingerprint


# -- commits ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_one_commit_per_step(store: Store, run: Run, n: int) -> None:
    steps = [f"s{index}" for index in range(n)]
    counting = Counting(store)
    run(Executor(store=counting), logging_setup(f"durable.steps-{n}", steps, sequence=steps))
    # The first commit creates the saga and starts step 1; each later one carries a
    # step's outcome with the next step's start, and the last one the end.
    assert len(counting.commits) == n + 1
    assert [commit.seq for commit in counting.commits] == list(range(n + 1))
    assert [commit.status for commit in counting.commits] == ["running"] + [None] * (n - 1) + [
        "completed"
    ]
    assert [commit.header is not None for commit in counting.commits] == [True] + [False] * n
    assert [kinds(commit.entries) for commit in counting.commits] == [
        ["saga_started", "run_started"],
        *[["run_succeeded", "run_started"]] * (n - 1),
        ["run_succeeded", "saga_ended"],
    ]


def test_nested_runs_and_the_rollback_commit_as_they_go(store: Store, run: Run) -> None:
    counting = Counting(store)
    with pytest.raises(OutOfStock, match=exactly("car")):
        run(Executor(store=counting), Trip(fail_car=True), saga_id="t-1")
    assert [(commit.status, kinds(commit.entries)) for commit in counting.commits] == [
        ("running", ["saga_started", "run_started"]),  # flight
        (None, ["run_succeeded", "run_started"]),  # flight; hotel
        (None, ["run_started"]),  # quote, nested: its start at once...
        (None, ["run_succeeded"]),  # ...and its outcome at once
        (None, ["run_started"]),  # upgrade
        (None, ["run_failed"]),  # upgrade
        (None, ["run_succeeded", "run_started"]),  # hotel; car
        ("compensating", ["run_failed", "rollback_started", "run_started"]),  # cancel_hotel
        (None, ["run_succeeded", "run_started"]),  # cancel_hotel; cancel_flight
        ("compensated", ["run_succeeded", "saga_ended"]),
    ]


def test_every_transition_is_durable_before_it_is_acted_on(store: Store, run: Run) -> None:
    seen: list[tuple[str, list[str], list[str] | None]] = []

    def look(name: str) -> Callable[[Context], None]:
        def fn(ctx: Context) -> None:
            stored = loaded(store, ctx.saga_id)
            last = stored.entries[-1]
            before = stored.entries[-2] if len(stored.entries) > 1 else None
            seen.append(
                (
                    name,
                    [stored.status, last["kind"], last.get("action", "")],
                    None if before is None else [before["kind"]],
                )
            )
            if name == "b":
                ctx.run("n")
                after = loaded(store, ctx.saga_id).entries[-1]
                seen.append(("b after n", [after["kind"], str(after["run"])], None))
            if name == "c":
                raise OutOfStock("c")

        return fn

    setup = declsaga.new(
        {name: look(name) for name in ["a", "b", "c", "n", "undo_a", "undo_b"]},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
        name="durable.look",
    )
    with pytest.raises(OutOfStock):
        run(Executor(store=store), setup, saga_id="l-1")
    assert seen == [
        ("a", ["running", "run_started", "a"], ["saga_started"]),
        ("b", ["running", "run_started", "b"], ["run_succeeded"]),  # with a's outcome
        ("n", ["running", "run_started", "n"], ["run_started"]),
        ("b after n", ["run_succeeded", "2"], None),  # n's outcome, before b goes on
        ("c", ["running", "run_started", "c"], ["run_succeeded"]),
        ("undo_b", ["compensating", "run_started", "undo_b"], ["rollback_started"]),
        ("undo_a", ["compensating", "run_started", "undo_a"], ["run_succeeded"]),
    ]


# -- the journal --------------------------------------------------------------------------


def without_times(entries: Sequence[JSONEntry]) -> list[JSONEntry]:
    for entry in entries:
        if "at" in entry:
            assert isinstance(entry["at"], float)
    return [{key: value for key, value in entry.items() if key != "at"} for entry in entries]


def test_the_journal_of_a_success(store: Store, run: Run) -> None:
    run(Executor(store=store), Trip(), saga_id="t-1")
    stored = loaded(store, "t-1")
    assert stored.header == SagaHeader(
        "t-1",
        "durablesagas.Trip",
        plan(Trip).fingerprint,
        {
            "sequence": ["flight", "hotel", "car"],
            "compensators": {"flight": "cancel_flight", "hotel": "cancel_hotel"},
            "actions": sorted(
                ["flight", "cancel_flight", "hotel", "cancel_hotel", "quote", "upgrade", "car"]
            ),
        },
        {"budget": 1000, "booked": {"$tuple": []}, "fail_car": False},
    )
    upgrade_error = {
        "module": "durablesagas",
        "type": "OutOfStock",
        "message": "suite",
        "args": ["suite"],
    }
    assert without_times(stored.entries) == [
        {"kind": "saga_started"},
        {"kind": "run_started", "run": 0, "action": "flight", "role": "step"},
        {
            "kind": "run_succeeded",
            "run": 0,
            "result": {"seat": "12A"},
            "fields": {"budget": 1000, "booked": {"$tuple": ["flight"]}, "fail_car": False},
        },
        {"kind": "run_started", "run": 1, "action": "hotel", "role": "step"},
        {
            "kind": "run_started",
            "run": 2,
            "action": "quote",
            "role": "call",
            "parent": 1,
            "index": 0,
        },
        {
            "kind": "run_succeeded",
            "run": 2,
            "result": 3,
            "fields": {"budget": 700, "booked": {"$tuple": ["flight"]}, "fail_car": False},
        },
        {
            "kind": "run_started",
            "run": 3,
            "action": "upgrade",
            "role": "call",
            "parent": 1,
            "index": 1,
        },
        {"kind": "run_failed", "run": 3, "error": upgrade_error},  # fields unchanged: none
        {
            "kind": "run_succeeded",
            "run": 1,
            "result": 3,
            "fields": {
                "budget": 700,
                "booked": {"$tuple": ["flight", "hotel"]},
                "fail_car": False,
            },
        },
        {"kind": "run_started", "run": 4, "action": "car", "role": "step"},
        {
            "kind": "run_succeeded",
            "run": 4,
            "fields": {
                "budget": 700,
                "booked": {"$tuple": ["flight", "hotel", "car"]},
                "fail_car": False,
            },
        },
        {"kind": "saga_ended", "status": "completed", "error": None},
    ]
    assert stored.status == "completed"


def test_the_journal_of_a_compensated_saga(store: Store, run: Run) -> None:
    def fail(ctx: Context) -> None:
        LOG.append(f"b {ctx.idempotency_key}")
        raise OutOfStock("b")

    setup = declsaga.new(
        {"a": lambda ctx: "done", "b": fail, "undo_a": lambda ctx: None},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
        name="durable.compensated-journal",
    )
    with pytest.raises(OutOfStock):
        run(Executor(store=store), setup, saga_id="j-1")
    error = {"module": "durablesagas", "type": "OutOfStock", "message": "b", "args": ["b"]}
    stored = loaded(store, "j-1")
    assert stored.header.fields is None  # a new() setup has no fields, nor records any
    assert without_times(stored.entries) == [
        {"kind": "saga_started"},
        {"kind": "run_started", "run": 0, "action": "a", "role": "step"},
        {"kind": "run_succeeded", "run": 0, "result": "done"},
        {"kind": "run_started", "run": 1, "action": "b", "role": "step"},
        {"kind": "run_failed", "run": 1, "error": error},
        {"kind": "rollback_started", "error": error},
        {"kind": "run_started", "run": 2, "action": "undo_a", "role": "compensation", "target": 0},
        {"kind": "run_succeeded", "run": 2},
        {"kind": "saga_ended", "status": "compensated", "error": error},
    ]
    assert stored.status == "compensated"


# -- idempotent start ---------------------------------------------------------------------


def test_an_ended_saga_returns_its_recorded_report(store: Store, run: Run) -> None:
    reported: list[Report] = []
    executor = Executor(store=store, reporter=reported.append)
    first = run(executor, Trip(budget=500), saga_id="t-1")
    assert LOG == [
        "flight t-1/0",
        "hotel t-1/1",
        "quote t-1/2",
        "upgrade t-1/3",
        "no upgrade",
        "car t-1/4",
    ]
    assert reported == [first]
    del LOG[:], reported[:]

    trip = Trip(budget=500)
    again = run(executor, trip, saga_id="t-1")
    assert (LOG, reported) == ([], [])  # nothing ran, nobody was told
    assert (trip.budget, trip.booked, trip.fail_car) == (200, ("flight", "hotel", "car"), False)
    assert names(again.runs) == names(first.runs) == ["flight", "quote", "upgrade", "hotel", "car"]
    assert errors(again.runs) == [None, None, ("upgrade", "OutOfStock", "suite"), None, None]
    assert isinstance(again.runs[2].error, OutOfStock)  # rebuilt as its own class
    assert again.error is None
    assert abs(again.start - first.start).total_seconds() < 0.05
    # The recorded end is when the saga ended; the first report's end was taken after the
    # last commit, so it may be later by that commit's time.
    assert timedelta(seconds=-0.05) <= first.end - again.end < timedelta(seconds=0.5)
    for recorded, original in zip(again.runs, first.runs, strict=True):
        assert abs(recorded.start - original.start).total_seconds() < 0.05
        assert recorded.end - recorded.start == recorded.runtime
    assert again.runs[3].compensated_by is None
    assert again.end - again.start == again.runtime


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (OutOfStock("o-1"), OutOfStock, "o-1"),
        (
            CardDeclined("c-9"),
            RecordedError,
            "durablesagas.CardDeclined: the card was declined (c-9)",
        ),
        (KeyError("k"), KeyError, "'k'"),
    ],
)
def test_a_compensated_saga_raises_its_recorded_error_again(
    store: Store, run: Run, error: Exception, expected: type[Exception], message: str
) -> None:
    def fail(ctx: Context) -> None:
        LOG.append("fail")
        raise error

    setup = declsaga.new(
        {"a": lambda ctx: LOG.append("a"), "b": fail, "undo_a": lambda ctx: LOG.append("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
        name="durable.compensated-again",
    )
    reported: list[Report] = []
    executor = Executor(store=store, reporter=reported.append)
    with pytest.raises(type(error)) as first:
        run(executor, setup, saga_id="c-1")
    assert first.value is error
    assert LOG == ["a", "fail", "undo_a"]
    del LOG[:], reported[:]

    with pytest.raises(expected, match=exactly(message)) as again:
        run(executor, setup, saga_id="c-1")
    assert type(again.value) is expected
    if isinstance(again.value, RecordedError):
        assert again.value.type_name == "durablesagas.CardDeclined"
        assert again.value.message == "the card was declined (c-9)"
    assert (LOG, reported) == ([], [])


def test_a_failed_saga_raises_compensation_failed_again(store: Store, run: Run) -> None:
    def undo(ctx: Context) -> None:
        LOG.append("undo_a")
        raise CardDeclined("refund")

    def fail(ctx: Context) -> None:
        raise OutOfStock("b")

    setup = declsaga.new(
        {"a": lambda ctx: None, "b": fail, "undo_a": undo},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
        name="durable.failed-again",
    )
    executor = Executor(store=store)
    message = (
        "The rollback after OutOfStock(b) failed with CardDeclined(the card was declined (refund))."
    )
    with pytest.raises(CompensationFailed, match=exactly(message)):
        run(executor, setup, saga_id="f-1")
    assert loaded(store, "f-1").status == "failed"
    del LOG[:]

    with pytest.raises(CompensationFailed, match=exactly(message)) as again:
        run(executor, setup, saga_id="f-1")
    assert LOG == []
    assert type(again.value.action_error) is OutOfStock
    assert str(again.value.action_error) == "b"
    inner = again.value.error
    assert isinstance(inner, RecordedError)
    assert str(inner) == "durablesagas.CardDeclined: the card was declined (refund)"
    assert again.value.__cause__ is inner


def test_another_definition_or_other_initial_fields_are_refused(store: Store, run: Run) -> None:
    executor = Executor(store=store)
    run(executor, PlaceOrder(order_id="o-1", amount=30), saga_id="o-1")
    del LOG[:]
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 'o-1' is recorded with other settings: this call gives other initial "
            "values for amount, order_id."
        ),
    ):
        run(executor, PlaceOrder(order_id="o-2", amount=31), saga_id="o-1")
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 'o-1' is recorded with other settings: this call gives the definition "
            "'durablesagas.Trip' (recorded: 'durablesagas.place-order')."
        ),
    ):
        run(executor, Trip(), saga_id="o-1")
    setup = logging_setup("durable.other-definition", ["a"])
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 'o-1' is recorded with other settings: this call gives the definition "
            "'durable.other-definition' (recorded: 'durablesagas.place-order')."
        ),
    ):
        run(executor, setup, saga_id="o-1")
    assert LOG == []
    order = PlaceOrder(order_id="o-1", amount=30)
    run(executor, order, saga_id="o-1")  # the same settings: the recorded report
    assert (LOG, order.charged) == ([], 30)


def test_a_changed_definition_under_the_same_name_is_refused(store: Store, run: Run) -> None:
    # Written by an older version of the same named setup: craft its header.
    setup = logging_setup("durable.changed", ["a", "b"], sequence=["a", "b"])
    old = fingerprint_of(["a"], {}, ["a"])
    new = fingerprint_of(["a", "b"], {}, ["a", "b"])
    write_header(store, "c-1", "durable.changed", old, {"sequence": ["a"], "actions": ["a"]})
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 'c-1' is recorded with other settings: this call gives a definition with "
            f"fingerprint {new} (recorded: {old}; sequence ['a'] became ['a', 'b']; actions "
            "added: b)."
        ),
    ):
        run(Executor(store=store), setup, saga_id="c-1")
    assert LOG == []


def write_header(
    store: Store,
    saga_id: str,
    name: str,
    fingerprint: str,
    definition: Mapping[str, Any],
    *,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """A saga started by another process, which ran its first step and died."""
    claim = store.claim(saga_id)
    assert claim is not None
    entries = (
        {"kind": "saga_started", "at": time.time()},
        {"kind": "run_started", "run": 0, "action": "a", "role": "step", "at": time.time()},
    )
    definition = {"sequence": [], "compensators": {}, "actions": [], **definition}
    header = SagaHeader(saga_id, name, fingerprint, definition, fields)
    store.append(claim, Commit(0, entries, "running", header))
    store.release(claim)


def test_an_unfinished_saga_is_resumed_by_execute(store: Store, run: Run) -> None:
    crash(store, 3, run, PlaceOrder(order_id="o-1", amount=30), "o-1")
    assert LOG == ["reserve o-1/0", "charge o-1/1"]
    del LOG[:]
    reported: list[Report] = []
    order = PlaceOrder(order_id="o-1", amount=30)
    report = run(Executor(store=store, reporter=reported.append), order, saga_id="o-1")
    assert LOG == ["charge o-1/1", "ship o-1/2"]
    assert names(report.runs) == ["reserve", "charge", "ship"]
    assert reported == [report]
    assert (order.reserved, order.charged) == (True, 30)
    assert loaded(store, "o-1").status == "completed"


# -- SagaBusy -----------------------------------------------------------------------------


def test_a_saga_driven_by_another_thread_is_busy(
    store: Store, run: Run, gate: threading.Event
) -> None:
    entered = threading.Event()

    def wait(ctx: Context) -> None:
        LOG.append(f"wait {ctx.idempotency_key}")
        entered.set()
        assert gate.wait(10)

    setup = declsaga.new(
        {"wait": wait, "next": lambda ctx: LOG.append("next")},
        sequence=["wait", "next"],
        name="durable.busy",
    )
    executor = Executor(store=store)
    outcome: list[Report] = []
    driver = threading.Thread(target=lambda: outcome.append(executor.execute(setup, saga_id="b-1")))
    driver.start()
    try:
        assert entered.wait(10)
        before = loaded(store, "b-1")
        with pytest.raises(
            SagaBusy, match=exactly("Saga 'b-1' is being driven by another live process or thread.")
        ) as busy:
            run(executor, setup, saga_id="b-1")
        assert busy.value.saga_id == "b-1"
        assert Executor(store=store).recover() == []  # skipped: a live thread drives it
        assert loaded(store, "b-1") == before
    finally:
        gate.set()
        driver.join(10)
    assert names(outcome[0].runs) == ["wait", "next"]
    assert LOG == ["wait b-1/0", "next"]


CHILD = """
import sys
import declsaga, durablesagas

store = declsaga.SQLiteStore(sys.argv[1])
declsaga.Executor(store=store).execute(
    durablesagas.PlaceOrder(order_id="o-1", amount=30), saga_id="order-o-1"
)
"""


def test_a_killed_process_saga_is_recovered_at_once(tmp_path: Path) -> None:
    path = tmp_path / "sagas.db"
    env = {
        **os.environ,
        durablesagas.CRASH_ENV: "charge",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    with (
        SQLiteStore(path) as store,
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        ) as child,
    ):
        assert child.stdout is not None
        assert child.stdout.readline() == "charging order-o-1/1\n"
        # The child drives it: recover() leaves it, execute() says who has it.
        executor = Executor(store=store)
        assert executor.recover() == []
        with pytest.raises(SagaBusy):
            executor.execute(PlaceOrder(order_id="o-1", amount=30), saga_id="order-o-1")
        child.kill()  # SIGKILL: nothing runs in the child any more
        child.wait()
        [recovered] = executor.recover()  # at once: no lease to wait out
        assert recovered.saga_id == "order-o-1"
        assert recovered.status == "completed"
        assert LOG == ["charge order-o-1/1", "ship order-o-1/2"]  # reserve never again
        record = read(store, "order-o-1")
        assert record.fields == {"order_id": "o-1", "amount": 30, "reserved": True, "charged": 30}


# -- recovery -----------------------------------------------------------------------------

TRIP_RUNS = {
    False: ["flight", "quote", "upgrade", "hotel", "car"],
    True: ["flight", "quote", "upgrade", "hotel", "car", "cancel_hotel", "cancel_flight"],
}
TRIP_COMMITS = {False: 8, True: 10}


def test_recovery_finishes_a_saga_that_died_at_any_commit(store: Store, run: Run) -> None:
    """For every commit of a saga with nested calls and a rollback, and both sides of it
    (lost, landed): recovery ends the saga as an uninterrupted execution would; runs
    recorded as finished never run again; runs in flight run again with their key."""
    recover = _Recover("recover" if run.mode == "execute" else "recover_async")
    for fail_car in (False, True):
        del LOG[:]
        run_id = f"u-{fail_car}"
        try:
            run(Executor(store=store), Trip(fail_car=fail_car), saga_id=run_id)
        except OutOfStock:
            assert fail_car
        uninterrupted = [line.replace(run_id, "{id}") for line in LOG]
        expected = read(store, run_id)
        assert expected.status == ("compensated" if fail_car else "completed")
        assert names(runs_of(expected)) == TRIP_RUNS[fail_car]
        for at in range(1, TRIP_COMMITS[fail_car] + 1):
            for landed in (False, True):
                saga_id = f"t-{fail_car}-{at}-{landed}"
                del LOG[:]
                with pytest.raises(StoreError, match=exactly(CRASH)):
                    run(
                        Executor(store=Crashing(store, at, landed=landed)),
                        Trip(fail_car=fail_car),
                        saga_id=saga_id,
                    )
                before = list(LOG)
                del LOG[:]
                at_crash = store.load(saga_id)
                reported: list[Report] = []
                recovered = recover(Executor(store=store, reporter=reported.append))
                after = list(LOG)
                where = (fail_car, at, landed)
                if at_crash is None:  # died before its first commit: nothing to do
                    assert (recovered, before, after) == ([], [], []), where
                    continue
                if at_crash.status in ("completed", "compensated"):  # died after the end
                    assert (recovered, after) == ([], []), where
                else:
                    [one] = recovered
                    assert (one.saga_id, one.name, one.refused) == (
                        saga_id,
                        "durablesagas.Trip",
                        None,
                    ), where
                    assert one.status == expected.status, where
                    assert reported == [one.report], where
                    assert one.report is not None
                    assert names(one.report.runs) == TRIP_RUNS[fail_car], where
                    if fail_car:
                        assert type(one.error) is OutOfStock, where
                        assert str(one.error) == "car"
                    else:
                        assert one.error is None, where
                record = read(store, saga_id)
                assert (record.status, record.fields) == (expected.status, expected.fields), where
                assert names(runs_of(record)) == TRIP_RUNS[fail_car], where
                executed_before = [line for line in before if line != "no upgrade"]
                executed_after = [line for line in after if line != "no upgrade"]
                finished = {
                    f"{name} {key}" for name in TRIP_RUNS[True] for key in keys_finished(at_crash)
                }
                # Nothing recorded as finished runs again; what was in flight does, with
                # the same key; together they are the uninterrupted execution.
                assert not finished & set(executed_after), where
                assert set(executed_before) - finished <= set(executed_after), where
                combined = executed_before + [
                    line for line in executed_after if line not in executed_before
                ]
                assert [line.replace(saga_id, "{id}") for line in combined] == [
                    line for line in uninterrupted if line != "no upgrade"
                ], where


def test_a_reexecuted_run_replays_its_recorded_nested_calls(
    store: Store, run: Run, recover: Recover
) -> None:
    # Commits: 1 flight, 2 hotel, 3 quote started, 4 quote ok, 5 upgrade started,
    # 6 upgrade failed, 7 hotel's outcome: dying there, hotel runs again.
    crash(store, 7, run, Trip(), "t-1")
    assert LOG == ["flight t-1/0", "hotel t-1/1", "quote t-1/2", "upgrade t-1/3", "no upgrade"]
    del LOG[:]
    [recovered] = recover(Executor(store=store))
    # quote returns its recorded 3 and restores the fields after it (budget 700) without
    # running; upgrade raises its recorded OutOfStock without running.
    assert LOG == ["hotel t-1/1", "no upgrade", "car t-1/4"]
    assert recovered.status == "completed"
    record = read(store, "t-1")
    assert record.fields == {"budget": 700, "booked": ("flight", "hotel", "car"), "fail_car": False}
    assert names(runs_of(record)) == ["flight", "quote", "upgrade", "hotel", "car"]
    assert errors(runs_of(record))[2] == ("upgrade", "OutOfStock", "suite")


def define_counter() -> type[Saga]:
    class Counter(Saga):
        count: int = 0

        @step(order=1)
        def one(self, ctx: Context) -> None:
            LOG.append(f"one {ctx.idempotency_key} starts at {self.count}")
            self.count += 1
            ctx.run("bump")
            self.count += 100
            LOG.append(f"one {ctx.idempotency_key} ends at {self.count}")

        @compensates("one")
        def undo_one(self, ctx: Context) -> None:
            LOG.append(f"undo_one {ctx.idempotency_key} starts at {self.count}")
            ctx.run("bump")
            self.count = -self.count

        @declsaga.action
        def bump(self, ctx: Context) -> None:
            LOG.append(f"bump {ctx.idempotency_key} at {self.count}")
            self.count += 10

        @step(order=2)
        def two(self, ctx: Context) -> None:
            LOG.append(f"two {ctx.idempotency_key} at {self.count}")
            if self.count > 1000:
                raise OutOfStock("two")

    return Counter


@pytest.mark.parametrize("count", [0, 1000])
def test_a_run_executes_again_from_the_fields_recorded_when_it_started(
    store: Store, run: Run, recover: Recover, count: int
) -> None:
    # Commits: 1 one, 2 bump started, 3 bump ok (count+11), 4 one ok + two started; with
    # 1000, two fails: 5 undo_one started, 6 bump started, 7 bump ok, 8 undo_one ok. Dying
    # at 4, or 8: one, or undo_one, runs again, its nested bump replayed.
    counter = define_counter()
    crash(store, 4 if count == 0 else 8, run, counter(count=count), "c-1")
    del LOG[:]
    [recovered] = recover(Executor(store=store))
    if count == 0:
        assert LOG == [
            "one c-1/0 starts at 0",  # not at 11, the fields recorded after bump
            "one c-1/0 ends at 111",  # bump's recorded fields restored, without running
            "two c-1/2 at 111",
        ]
        assert recovered.status == "completed"
    else:
        assert LOG == ["undo_one c-1/3 starts at 1111"]  # not at 1121
        assert recovered.status == "compensated"
        assert read(store, "c-1").fields == {"count": -1121}


def test_a_nested_call_in_flight_runs_again_with_its_key(
    store: Store, run: Run, recover: Recover
) -> None:
    crash(store, 4, run, Trip(), "t-1")  # quote's outcome is lost
    assert LOG == ["flight t-1/0", "hotel t-1/1", "quote t-1/2"]
    del LOG[:]
    recover(Executor(store=store))
    assert LOG == ["hotel t-1/1", "quote t-1/2", "upgrade t-1/3", "no upgrade", "car t-1/4"]
    # hotel ran again from the fields recorded when it STARTED: quote took 300 once.
    assert read(store, "t-1").fields == {
        "budget": 700,
        "booked": ("flight", "hotel", "car"),
        "fail_car": False,
    }


def test_a_different_action_at_a_recorded_call_position_is_a_saga_error(
    store: Store, run: Run, recover: Recover
) -> None:
    calls = ["n1", "n2"]

    def parent(ctx: Context) -> None:
        LOG.append(f"parent {ctx.idempotency_key}")
        for name in list(calls):
            ctx.run(name)

    def nested(name: str) -> Callable[[Context], None]:
        return lambda ctx: LOG.append(f"{name} {ctx.idempotency_key}")

    setup = declsaga.new(
        {"first": nested("first"), "parent": parent, "n1": nested("n1"), "n2": nested("n2")},
        sequence=["first", "parent"],
        compensators={"first": "n2"},
        name="durable.call-positions",
    )
    crash(store, 7, run, setup, "p-1")  # n1 and n2 recorded; parent's outcome lost
    assert LOG == ["first p-1/0", "parent p-1/1", "n1 p-1/2", "n2 p-1/3"]
    del LOG[:]
    calls.reverse()  # the code changed: n2 is now its first call
    [recovered] = recover(Executor(store=store))
    message = (
        "Saga 'p-1': action 'parent' now runs 'n2' as its call number 1, where its journal "
        "recorded 'n1'; concurrent nested calls must start in a deterministic order."
    )
    assert type(recovered.error) is SagaError
    assert str(recovered.error) == message
    assert recovered.status == "compensated"
    assert LOG == ["parent p-1/1", "n2 p-1/4"]  # the parent failed; first was compensated
    assert names(runs_of(read(store, "p-1"))) == ["first", "n1", "n2", "parent", "n2"]
    assert errors(runs_of(read(store, "p-1"))) == [
        None,
        None,
        None,
        ("parent", "SagaError", message),
        None,
    ]


def compensable(name: str, seconds: float = 0.0) -> Callable[[Context], None]:
    def fn(ctx: Context) -> None:
        LOG.append(f"{name} {ctx.idempotency_key}")
        time.sleep(seconds)

    return fn


def failing(ctx: Context) -> None:
    LOG.append(f"fail {ctx.idempotency_key}")
    raise OutOfStock("no stock")


def three_compensable(name: str, seconds: float = 0.0) -> Setup:
    return declsaga.new(
        {
            "a": compensable("a"),
            "b": compensable("b"),
            "c": compensable("c"),
            "d": failing,
            "undo_a": compensable("undo_a", seconds),
            "undo_b": compensable("undo_b", seconds),
            "undo_c": compensable("undo_c", seconds),
        },
        sequence=["a", "b", "c", "d"],
        compensators={"a": "undo_a", "b": "undo_b", "c": "undo_c"},
        name=name,
    )


@pytest.mark.parametrize("landed", [False, True])
def test_a_rollback_in_progress_continues_with_the_next_compensation(
    store: Store, run: Run, recover: Recover, landed: bool
) -> None:
    setup = three_compensable("durable.rollback-in-progress")
    # Commits: 1-4 the steps, 5 d failed + undo_c started, 6 undo_c ok + undo_b started.
    with pytest.raises(StoreError, match=exactly(CRASH)):
        run(Executor(store=Crashing(store, 6, landed=landed)), setup, saga_id="r-1")
    assert LOG == ["a r-1/0", "b r-1/1", "c r-1/2", "fail r-1/3", "undo_c r-1/4"]
    assert loaded(store, "r-1").status == "compensating"
    del LOG[:]
    reported: list[Report] = []
    [recovered] = recover(Executor(store=store, reporter=reported.append))
    if landed:  # undo_c's success landed, undo_b was started: it runs, under its key
        assert LOG == ["undo_b r-1/5", "undo_a r-1/6"]
    else:  # undo_c's outcome was lost: it runs again, under the same key
        assert LOG == ["undo_c r-1/4", "undo_b r-1/5", "undo_a r-1/6"]
    assert (recovered.status, type(recovered.error), str(recovered.error)) == (
        "compensated",
        OutOfStock,
        "no stock",
    )
    report = recovered.report
    assert report is not None
    assert reported == [report]
    assert report.error is recovered.error
    assert names(report.runs) == ["a", "b", "c", "d", "undo_c", "undo_b", "undo_a"]
    assert names(report.compensated) == ["a", "b", "c"]
    assert [run.compensated_by for run in report.compensated] == [
        report.runs[6],
        report.runs[5],
        report.runs[4],
    ]
    assert loaded(store, "r-1").status == "compensated"


def test_a_resumed_rollback_has_a_fresh_budget(store: Store, recover: Recover) -> None:
    setup = declsaga.new(
        {
            "a": compensable("a"),
            "b": compensable("b"),
            "c": failing,
            "undo_a": compensable("undo_a", 0.2),
            "undo_b": compensable("undo_b", 0.2),
        },
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
        name="durable.fresh-budget",
    )
    # Commit 5 holds undo_b's success and undo_a's start: it lands, and the process dies.
    executor = Executor(store=Crashing(store, 5, landed=True), compensate_timeout=0.35)
    with pytest.raises(StoreError, match=exactly(CRASH)):
        executor.execute(setup, saga_id="r-1")
    assert LOG == ["a r-1/0", "b r-1/1", "fail r-1/2", "undo_b r-1/3"]
    del LOG[:]
    # undo_b took 0.2 s of the first budget; undo_a's 0.2 s fit in a fresh one only.
    [recovered] = recover(Executor(store=store, compensate_timeout=0.35))
    assert LOG == ["undo_a r-1/4"]
    assert (recovered.status, type(recovered.error)) == ("compensated", OutOfStock)


def test_a_recovered_report_starts_at_the_first_start(
    store: Store, run: Run, recover: Recover
) -> None:
    before = datetime.now(UTC)
    crash(store, 3, run, PlaceOrder(order_id="o-1", amount=30), "o-1")
    crashed = datetime.now(UTC)
    del LOG[:]
    [recovered] = recover(Executor(store=store))
    report = recovered.report
    assert report is not None
    assert before <= report.start <= crashed
    assert crashed <= report.end <= datetime.now(UTC)
    assert report.end - report.start == report.runtime
    # reserve as recorded by the first execution, then charge (run again) and ship.
    assert names(report.runs) == ["reserve", "charge", "ship"]
    assert before <= report.runs[0].start <= report.runs[0].end <= crashed
    # charge started (as recorded) before the crash and ended when it ran again.
    assert report.runs[1].start <= crashed <= report.runs[1].end <= report.runs[2].start
    assert LOG == ["charge o-1/1", "ship o-1/2"]


def test_recover_finishes_every_unfinished_saga_and_reports_each_once(
    store: Store, run: Run, recover: Recover, caplog: pytest.LogCaptureFixture
) -> None:
    crash(store, 2, run, PlaceOrder(order_id="o-1", amount=30), "s-1")  # will complete
    crash(store, 3, run, PlaceOrder(order_id="o-2", amount=300), "s-2")  # will compensate
    run(Executor(store=store), PlaceOrder(order_id="o-3", amount=3), saga_id="s-3")  # ended
    write_header(store, "s-4", "durable.nobody", "0" * 16, {"sequence": ["a"]})  # refused
    crash(store, 5, run, PlaceOrder(order_id="o-5", amount=300), "s-5")  # compensating
    assert store.unfinished() == ["s-1", "s-2", "s-4", "s-5"]
    del LOG[:]
    reported: list[Report] = []
    with caplog.at_level(logging.WARNING, logger="declsaga"):
        recovered = recover(Executor(store=store, reporter=reported.append))
    assert [(one.saga_id, one.name, one.status, one.refused is None) for one in recovered] == [
        ("s-1", "durablesagas.place-order", "completed", True),
        ("s-2", "durablesagas.place-order", "compensated", True),
        ("s-4", "durable.nobody", "running", False),
        ("s-5", "durablesagas.place-order", "compensated", True),
    ]
    assert reported == [recovered[0].report, recovered[1].report, recovered[3].report]
    assert [(record.levelname, record.name) for record in caplog.records] == [
        ("WARNING", "declsaga")
    ]
    assert LOG == [
        "reserve s-1/0",
        "charge s-1/1",
        "ship s-1/2",
        "charge s-2/1",
        "ship s-2/2",
        "release s-2/3",
        "release s-5/3",
    ]
    assert store.unfinished() == ["s-4"]
    again = recover(Executor(store=store))
    assert [(one.saga_id, one.refused) for one in again] == [("s-4", recovered[2].refused)]


def test_a_saga_of_an_unknown_definition_is_refused_and_left_untouched(
    store: Store, recover: Recover, caplog: pytest.LogCaptureFixture
) -> None:
    fields = {"order_id": "o-1"}
    write_header(store, "x-1", "gone.Order", "f" * 16, {"sequence": ["a"]}, fields=fields)
    before = loaded(store, "x-1")
    with caplog.at_level(logging.WARNING, logger="declsaga"):
        [recovered] = recover(Executor(store=store))
    message = (
        "Saga 'x-1' was started by the definition 'gone.Order', which is not registered in "
        "this process: import the module that defines it before calling recover(). It is "
        "left untouched."
    )
    assert (recovered.saga_id, recovered.name, recovered.status) == ("x-1", "gone.Order", "running")
    assert (recovered.report, recovered.error, recovered.refused) == (None, None, message)
    assert [(record.name, record.levelno, record.getMessage()) for record in caplog.records] == [
        ("declsaga", logging.WARNING, message)
    ]
    assert loaded(store, "x-1") == before


def shipment(*steps: str, **fields: int) -> type[Saga]:
    """One class statement, `test_durable.Shipment`, in the shape of a given version."""
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": "Shipment",
        "__annotations__": dict.fromkeys(fields, "int"),
        **fields,
    }

    def make(name: str) -> Callable[[Saga, Context], None]:
        def method(self: Saga, ctx: Context) -> None:
            values = {field.name: getattr(self, field.name) for field in attrs.fields(type(self))}
            LOG.append(f"{name} {ctx.idempotency_key} {values}")

        return method

    for order, name in enumerate(steps):
        namespace[name] = step(order=order)(make(name))
    return type("Shipment", (Saga,), namespace)


def crashed_shipment(store: Store, run: Run, saga: Saga) -> StoredSaga:
    crash(store, 2, run, saga, "sh-1")  # the first step ran; its outcome was lost
    del LOG[:]
    return loaded(store, "sh-1")


def test_a_changed_fingerprint_is_refused(
    store: Store, run: Run, recover: Recover, caplog: pytest.LogCaptureFixture
) -> None:
    old = shipment("pack", "send", weight=1)
    before = crashed_shipment(store, run, old(weight=5))
    new = shipment("pack", "label", "send", weight=1)
    with caplog.at_level(logging.WARNING, logger="declsaga"):
        [recovered] = recover(Executor(store=store))
    message = (
        f"Saga 'sh-1' was started by '{__name__}.Shipment' with fingerprint "
        f"{plan(old).fingerprint}; that definition now has fingerprint {plan(new).fingerprint} "
        "(sequence ['pack', 'send'] became ['pack', 'label', 'send']; actions added: label). "
        "It is left untouched."
    )
    assert plan(old).fingerprint != plan(new).fingerprint
    assert (recovered.status, recovered.report, recovered.error) == ("running", None, None)
    assert recovered.refused == message
    assert [record.getMessage() for record in caplog.records] == [message]
    assert loaded(store, "sh-1") == before
    assert LOG == []
    shipment("pack", "send", weight=1)  # the old version is back: recovery resumes it
    [recovered] = recover(Executor(store=store))
    assert recovered.status == "completed"
    assert LOG == ["pack sh-1/0 {'weight': 5}", "send sh-1/1 {'weight': 5}"]


def test_a_stored_field_the_class_no_longer_has_is_refused(
    store: Store, run: Run, recover: Recover
) -> None:
    before = crashed_shipment(store, run, shipment("pack", weight=1, width=2)(weight=5))
    shipment("pack", weight=1)
    [recovered] = recover(Executor(store=store))
    assert recovered.refused == (
        f"Saga 'sh-1' cannot be rebuilt: stored field 'width' is not a field of "
        f"{__name__}.Shipment any more. It is left untouched."
    )
    assert (recovered.status, recovered.report, recovered.error) == ("running", None, None)
    assert loaded(store, "sh-1") == before
    assert LOG == []


def test_a_field_added_since_takes_its_default(store: Store, run: Run, recover: Recover) -> None:
    crashed_shipment(store, run, shipment("pack", "send", weight=1)(weight=5))
    newer = shipment("pack", "send", weight=1, height=7)
    [recovered] = recover(Executor(store=store))
    assert recovered.status == "completed"
    assert LOG == [
        "pack sh-1/0 {'weight': 5, 'height': 7}",
        "send sh-1/1 {'weight': 5, 'height': 7}",
    ]
    assert read(store, "sh-1").fields == {"weight": 5, "height": 7}
    # Started again with the same fields (the new one at its default): the recorded report.
    report = run(Executor(store=store), newer(weight=5), saga_id="sh-1")
    assert names(report.runs) == ["pack", "send"]
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 'sh-1' is recorded with other settings: this call gives other initial "
            "values for height."
        ),
    ):
        run(Executor(store=store), newer(weight=5, height=8), saga_id="sh-1")
    assert len(LOG) == 2


def logged_validator(instance: object, attribute: object, value: object) -> None:
    LOG.append(f"validate {value}")


def test_a_restored_saga_is_built_without_init(store: Store, run: Run, recover: Recover) -> None:
    def define() -> type[Saga]:
        class Checked(Saga):
            amount: int = attrs.field(default=1, validator=logged_validator)

            def __attrs_post_init__(self) -> None:
                LOG.append("post_init")

            @step(order=1)
            def first(self, ctx: Context) -> None:
                LOG.append(f"first {self.amount}")
                self.amount += 1

            @step(order=2)
            def second(self, ctx: Context) -> None:
                LOG.append(f"second {self.amount}")

        return Checked

    saga = define()(amount=5)
    assert LOG == ["validate 5", "post_init"]
    crash(store, 3, run, saga, "c-1")  # first's success landed with the fields
    del LOG[:]
    define()  # a fresh process: the class statement runs again
    recover(Executor(store=store))
    assert LOG == ["second 6"]


def test_a_journal_that_cannot_be_read_here_is_refused_and_the_others_recovered(
    store: Store, run: Run, recover: Recover, caplog: pytest.LogCaptureFixture
) -> None:
    # Other processes recorded a result, and a field, of a class not imported here.
    color = {"$enum": "notimported.colors:Color", "name": "RED"}
    missing = (
        "class notimported.colors:Color cannot be found: module notimported.colors is not "
        "imported (the journal never imports modules; import it before reading)"
    )
    setup = logging_setup("durable.unreadable", ["a", "b"], sequence=["a", "b"])
    fingerprint = fingerprint_of(["a", "b"], {}, ["a", "b"])
    write_header(store, "u-1", "durable.unreadable", fingerprint, {"sequence": ["a", "b"]})
    result = {"kind": "run_succeeded", "run": 0, "at": time.time(), "result": color}
    append(store, "u-1", result)

    parcel = shipment("a", weight=1)
    write_header(
        store, "u-2", plan(parcel).name, plan(parcel).fingerprint, {}, fields={"weight": 1}
    )
    append(
        store,
        "u-2",
        {"kind": "run_succeeded", "run": 0, "at": time.time(), "fields": {"weight": color}},
    )

    before = [loaded(store, "u-1"), loaded(store, "u-2")]
    crash(store, 2, run, setup, "u-3")  # an ordinary unfinished saga, after them
    del LOG[:]
    with caplog.at_level(logging.WARNING, logger="declsaga"):
        recovered = recover(Executor(store=store))
    refusals = [
        f"Saga 'u-1' has a journal entry this version cannot read: {result!r} ({missing}). "
        "It is left untouched.",
        f"The fields of saga 'u-2' cannot be decoded here: field 'weight' of {__name__}."
        f"Shipment: {missing}. It is left untouched.",
    ]
    assert [(one.saga_id, one.status, one.refused) for one in recovered] == [
        ("u-1", "running", refusals[0]),
        ("u-2", "running", refusals[1]),
        ("u-3", "completed", None),
    ]
    assert [record.getMessage() for record in caplog.records] == refusals
    assert [loaded(store, "u-1"), loaded(store, "u-2")] == before
    assert LOG == ["a u-3/0", "b u-3/1"]
    # Started again by id, the same journals cannot be read either: a StoreError.
    with pytest.raises(
        StoreError, match=exactly(refusals[0].removesuffix(" It is left untouched."))
    ):
        run(Executor(store=store), setup, saga_id="u-1")
    with pytest.raises(
        StoreError, match=exactly(refusals[1].removesuffix(" It is left untouched."))
    ):
        run(Executor(store=store), parcel(weight=1), saga_id="u-2")
    assert [loaded(store, "u-1"), loaded(store, "u-2")] == before


def append(store: Store, saga_id: str, *entries: JSONEntry) -> None:
    """Append one commit of `entries` to a stored saga, as the process driving it would."""
    claim = store.claim(saga_id)
    assert claim is not None
    store.append(claim, Commit(loaded(store, saga_id).seq, entries))
    store.release(claim)


# -- store failure ------------------------------------------------------------------------


def order_setup(name: str) -> Setup:
    """reserve, charge (with a nested audit), ship (fails): two compensable steps."""

    def charge(ctx: Context) -> None:
        LOG.append(f"charge {ctx.idempotency_key}")
        ctx.run("audit")

    def ship(ctx: Context) -> None:
        LOG.append(f"ship {ctx.idempotency_key}")
        raise OutOfStock("ship")

    return declsaga.new(
        {
            "reserve": compensable("reserve"),
            "charge": charge,
            "audit": compensable("audit"),
            "ship": ship,
            "release": compensable("release"),
            "refund": compensable("refund"),
        },
        sequence=["reserve", "charge", "ship"],
        compensators={"reserve": "release", "charge": "refund"},
        name=name,
    )


@pytest.mark.parametrize(
    ("at", "ran", "status"),
    [
        (2, ["reserve s-1/0"], "running"),
        (4, ["reserve s-1/0", "charge s-1/1", "audit s-1/2"], "running"),
        (6, ["reserve s-1/0", "charge s-1/1", "audit s-1/2", "ship s-1/3"], "running"),
        (
            7,
            ["reserve s-1/0", "charge s-1/1", "audit s-1/2", "ship s-1/3", "refund s-1/4"],
            "compensating",
        ),
    ],
)
def test_a_store_failure_stops_the_execution_like_a_crash(
    store: Store, run: Run, at: int, ran: list[str], status: str
) -> None:
    reported: list[Report] = []
    crash(store, at, run, order_setup("durable.store-failure"), "s-1", reporter=reported.append)
    assert ran == LOG  # nothing after the failing commit, no rollback
    assert reported == []
    assert loaded(store, "s-1").status == status
    assert store.unfinished() == ["s-1"]
    del LOG[:]
    [recovered] = Executor(store=store).recover()
    assert recovered.status == "compensated"
    assert LOG[-2:] == ["refund s-1/4", "release s-1/5"]


def test_a_driver_error_is_the_cause(tmp_path: Path, run: Run) -> None:
    path = tmp_path / "locked.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locked: list[bool] = []

    def lock(ctx: Context) -> None:
        LOG.append(f"lock {ctx.idempotency_key}")
        if not locked:
            other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
            locked.append(True)

    setup = declsaga.new(
        {"lock": lock, "after": compensable("after"), "undo": compensable("undo")},
        sequence=["lock", "after"],
        compensators={"lock": "undo"},
        name="durable.locked",
    )
    with SQLiteStore(path, timeout=0.05) as store:
        with pytest.raises(
            StoreError,
            match=exactly(
                f"The database {path} stayed locked beyond the busy timeout of 0.05s while "
                "appending: another connection holds a write transaction."
            ),
        ) as failure:
            run(Executor(store=store), setup, saga_id="l-1")
        assert isinstance(failure.value.__cause__, sqlite3.OperationalError)
        assert failure.value.__cause__.sqlite_errorname == "SQLITE_BUSY"
        other.execute("ROLLBACK")
        other.close()
        assert LOG == ["lock l-1/0"]
        assert loaded(store, "l-1").status == "running"
        del LOG[:]
        [recovered] = Executor(store=store).recover()
        assert (recovered.status, LOG) == ("completed", ["lock l-1/0", "after l-1/1"])


class Broken(Delegate):
    """A store with a bug: its third append raises something that is not a StoreError."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.appends = 0

    def append(self, claim: Claim, commit: Commit) -> None:
        self.appends += 1
        if self.appends == 3:
            raise OSError("disk on fire")
        self.inner.append(claim, commit)


def test_a_store_that_raises_anything_else_fails_with_store_error(store: Store, run: Run) -> None:
    reported: list[Report] = []
    executor = Executor(store=Broken(store), reporter=reported.append)
    with pytest.raises(
        StoreError, match=exactly("The store failed: OSError('disk on fire').")
    ) as failure:
        run(executor, order_setup("durable.broken"), saga_id="b-1")
    assert isinstance(failure.value.__cause__, OSError)
    assert str(failure.value.__cause__) == "disk on fire"
    assert (LOG, reported) == (["reserve b-1/0", "charge b-1/1"], [])
    assert loaded(store, "b-1").status == "running"


def test_an_action_that_catches_the_store_error_cannot_carry_on(store: Store, run: Run) -> None:
    caught: list[StoreError] = []

    def careless(ctx: Context) -> str:
        LOG.append(f"careless {ctx.idempotency_key}")
        for _ in range(2):
            try:
                ctx.run("nested")
            except StoreError as error:
                caught.append(error)
        return "carried on"

    setup = declsaga.new(
        {
            "careless": careless,
            "nested": compensable("nested"),
            "next": compensable("next"),
            "undo": compensable("undo"),
        },
        sequence=["careless", "next"],
        compensators={"careless": "undo"},
        name="durable.careless",
    )
    reported: list[Report] = []
    # Commit 2 starts the nested run: it fails, so the nested action never runs.
    with pytest.raises(StoreError, match=exactly(CRASH)) as failure:
        run(Executor(store=Crashing(store, 2), reporter=reported.append), setup, saga_id="c-1")
    assert LOG == ["careless c-1/0"]  # neither nested, nor next, nor undo
    assert [str(error) for error in caught] == [CRASH, CRASH]
    assert failure.value is caught[0]
    assert reported == []
    assert loaded(store, "c-1").status == "running"


# -- EncodeError --------------------------------------------------------------------------


class Label(str):
    """A subclass of a supported type: refused, only exact types are stored."""

    __slots__ = ()


@attrs.frozen
class Unstorable:
    value: object
    where: str  # the path inside the field
    type_name: str
    reason: str


@pytest.mark.parametrize(
    "case",
    [
        Unstorable({1, 2}, "", "builtins.set", "sets are not stored; use a list or a tuple"),
        Unstorable(object(), "", "builtins.object", "it is not a type the journal stores"),
        Unstorable(
            Label("x"),
            "",
            f"{__name__}.Label",
            "it is a subclass of str, and only exact types are stored; convert it, e.g. str(value)",
        ),
        Unstorable(
            [1, {"k": b"x"}],
            "[1]['k']",
            "builtins.bytes",
            "bytes are not stored; store text, e.g. base64",
        ),
    ],
    ids=["set", "object", "str subclass", "nested bytes"],
)
def test_a_field_that_cannot_be_stored_fails_the_run(
    store: Store, run: Run, case: Unstorable
) -> None:
    value, where, type_name, reason = case.value, case.where, case.type_name, case.reason

    class Holder(Saga):
        value: object = 0

        @step(order=1)
        def first(self, ctx: Context) -> None:
            LOG.append(f"first {self.value}")
            self.value = 1

        @compensates("first")
        def undo_first(self, ctx: Context) -> None:
            LOG.append(f"undo_first {self.value}")

        @step(order=2)
        def second(self, ctx: Context) -> None:
            LOG.append(f"second {self.value}")
            self.value = value

        @step(order=3)
        def third(self, ctx: Context) -> None:
            LOG.append("third")

    message = (
        f"Action 'second' left field value{where} holding a {type_name}, which the journal "
        f"cannot store ({reason}). It stores {STORABLE}."
    )
    holder = Holder()
    with pytest.raises(EncodeError, match=exactly(message)) as failure:
        run(Executor(store=store), holder, saga_id="h-1")
    assert (failure.value.action, failure.value.type_name) == ("second", type_name)
    assert failure.value.what == f"field value{where}"
    # The fields went back to their last recorded value before the rollback.
    assert LOG == ["first 0", "second 1", "undo_first 1"]
    assert holder.value == 1
    record = read(store, "h-1")
    assert (record.status, record.fields) == ("compensated", {"value": 1})
    assert errors(runs_of(record))[1] == ("second", "EncodeError", message)


def test_a_result_that_cannot_be_stored_fails_the_run(store: Store, run: Run) -> None:
    def unstorable(ctx: Context) -> object:
        LOG.append("unstorable")
        return {"when": object()}

    setup = declsaga.new(
        {
            "a": compensable("a"),
            "b": unstorable,
            "undo_a": compensable("undo_a"),
            "undo_b": compensable("undo_b"),
        },
        sequence=["a", "b"],
        compensators={"a": "undo_a", "b": "undo_b"},
        name="durable.unstorable-result",
    )
    message = (
        "Action 'b' left its result['when'] holding a builtins.object, which the journal "
        f"cannot store (it is not a type the journal stores). It stores {STORABLE}."
    )
    with pytest.raises(EncodeError, match=exactly(message)):
        run(Executor(store=store), setup, saga_id="r-1")
    assert LOG == ["a r-1/0", "unstorable", "undo_a r-1/2"]  # b failed: not compensated
    assert read(store, "r-1").status == "compensated"


def test_initial_fields_that_cannot_be_stored_fail_before_anything_runs(
    store: Store, run: Run
) -> None:
    reported: list[Report] = []
    with pytest.raises(
        EncodeError,
        match=exactly(
            "The saga's initial field order_id holds a builtins.set, which the journal cannot "
            f"store (sets are not stored; use a list or a tuple). It stores {STORABLE}."
        ),
    ):
        run(
            Executor(store=store, reporter=reported.append),
            PlaceOrder(order_id={"o-1"}),  # type: ignore[arg-type]
            saga_id="o-1",
        )
    assert (LOG, reported, store.sagas()) == ([], [], [])


# -- cancellation and KeyboardInterrupt ---------------------------------------------------


def test_cancelling_a_durable_execute_async_rolls_back(store: Store, kind: str) -> None:
    entered = asyncio.Event()

    async def wait(ctx: Context) -> None:
        LOG.append(f"wait {ctx.idempotency_key}")
        entered.set()
        await asyncio.Event().wait()  # until cancelled

    undo: Callable[[Context], Any]
    if kind == "async":

        async def undo(ctx: Context) -> None:
            LOG.append(f"undo {ctx.idempotency_key}")

    else:
        undo = compensable("undo")
    setup = declsaga.new(
        {"a": compensable("a"), "wait": wait, "undo": undo},
        sequence=["a", "wait"],
        compensators={"a": "undo"},
        name=f"durable.cancelled-{kind}",
    )
    reported: list[Report] = []
    executor = Executor(store=store, reporter=reported.append)

    async def main() -> None:
        task = asyncio.create_task(executor.execute_async(setup, saga_id="c-1"))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert LOG == ["a c-1/0", "wait c-1/1", "undo c-1/2"]
    [report] = reported
    assert isinstance(report.error, asyncio.CancelledError)
    record = read(store, "c-1")
    assert record.status == "compensated"
    assert errors(runs_of(record)) == [
        None,
        ("wait", "RecordedError", "asyncio.exceptions.CancelledError: "),
        None,
    ]
    del LOG[:]
    # Started again: the recorded cancellation comes back as a RecordedError.
    with pytest.raises(
        RecordedError, match=exactly("asyncio.exceptions.CancelledError: ")
    ) as again:
        executor.execute(setup, saga_id="c-1")
    assert (again.value.type_name, again.value.message) == ("asyncio.exceptions.CancelledError", "")
    assert (LOG, len(reported)) == ([], 1)


def test_keyboard_interrupt_under_a_durable_execute_rolls_back(store: Store) -> None:
    def interrupted(ctx: Context) -> None:
        LOG.append(f"interrupted {ctx.idempotency_key}")
        raise KeyboardInterrupt

    setup = declsaga.new(
        {"a": compensable("a"), "b": interrupted, "undo": compensable("undo")},
        sequence=["a", "b"],
        compensators={"a": "undo"},
        name="durable.interrupted",
    )
    executor = Executor(store=store)
    with pytest.raises(KeyboardInterrupt):
        executor.execute(setup, saga_id="k-1")
    assert LOG == ["a k-1/0", "interrupted k-1/1", "undo k-1/2"]
    assert read(store, "k-1").status == "compensated"
    with pytest.raises(RecordedError, match=exactly("builtins.KeyboardInterrupt: ")):
        executor.execute(setup, saga_id="k-1")


def test_an_interrupted_rollback_that_fails_ends_failed(store: Store) -> None:
    def refuse(ctx: Context) -> None:
        raise OutOfStock("undo")

    def interrupted(ctx: Context) -> None:
        raise KeyboardInterrupt

    setup = declsaga.new(
        {"a": compensable("a"), "b": interrupted, "undo": refuse},
        sequence=["a", "b"],
        compensators={"a": "undo"},
        name="durable.interrupted-failed",
    )
    with pytest.raises(KeyboardInterrupt) as interrupt:
        Executor(store=store).execute(setup, saga_id="k-1")
    assert isinstance(interrupt.value.__cause__, CompensationFailed)
    assert read(store, "k-1").status == "failed"


# -- reading and statuses -----------------------------------------------------------------


def test_sagas_are_read_by_id_and_listed_by_status(store: Store, run: Run) -> None:
    failing_undo = declsaga.new(
        {"a": compensable("a"), "b": failing, "undo": failing},
        sequence=["a", "b"],
        compensators={"a": "undo"},
        name="durable.listing-failed",
    )
    run(Executor(store=store), PlaceOrder(order_id="o-1", amount=30), saga_id="completed")
    with pytest.raises(OutOfStock):
        run(Executor(store=store), PlaceOrder(order_id="o-2", amount=300), saga_id="compensated")
    with pytest.raises(CompensationFailed):
        run(Executor(store=store), failing_undo, saga_id="failed")
    crash(store, 2, run, PlaceOrder(order_id="o-4"), "running")
    crash(store, 5, run, PlaceOrder(order_id="o-5", amount=300), "compensating")
    statuses = ["completed", "compensated", "failed", "running", "compensating"]
    assert [record.saga_id for record in listed(store)] == statuses
    for status in statuses:
        assert [(record.saga_id, record.status) for record in listed(store, status)] == [
            (status, status)
        ]
    assert [record.finished for record in listed(store)] == [True, True, True, False, False]

    record = read(store, "compensated")
    assert (record.saga_id, record.name, record.status) == (
        "compensated",
        "durablesagas.place-order",
        "compensated",
    )
    assert record.fingerprint == plan(PlaceOrder).fingerprint
    assert record.definition == {
        "sequence": ["reserve", "charge", "ship"],
        "compensators": {"reserve": "release"},
        "actions": ["charge", "release", "reserve", "ship"],
    }
    assert record.fields == {"order_id": "o-2", "amount": 300, "reserved": False, "charged": 300}
    assert names(runs_of(record)) == ["reserve", "charge", "ship", "release"]
    assert record.report is not None
    assert type(record.report.error) is OutOfStock
    assert str(record.report.error) == "order o-2"
    assert record.journal == loaded(store, "compensated").entries
    assert record.created <= record.updated

    running = read(store, "running")
    assert running.fields == {"order_id": "o-4", "amount": 0, "reserved": False, "charged": 0}
    assert names(runs_of(running)) == []  # reserve ran, its outcome was never committed
    assert running.report is not None and running.report.error is None
    assert read(store, "failed").fields is None
    failed = read(store, "failed").report
    assert failed is not None and isinstance(failed.error, CompensationFailed)


def test_reading_unknown_ids_and_statuses_and_from_another_store_object(store: Store) -> None:
    Executor(store=store).execute(PlaceOrder(order_id="o-1"), saga_id="o-1")
    assert readable(store).get("unknown") is None
    with pytest.raises(
        ValueError,
        match=exactly(
            "Unknown saga status 'done'; use one of pending, running, compensating, completed, "
            "compensated, failed, resolved."
        ),
    ):
        listed(store, "done")
    assert listed(store, "running") == []
    if isinstance(store, SQLiteStore | PostgresStore):  # another object on the same data
        with (
            SQLiteStore(store.path)
            if isinstance(store, SQLiteStore)
            else PostgresStore(POSTGRES_DSN, schema=store.schema)
        ) as other:
            record = other.get("o-1")
            assert record is not None
            assert (record.status, record.fields) == (
                "completed",
                {"order_id": "o-1", "amount": 0, "reserved": True, "charged": 0},
            )
            assert [one.saga_id for one in other.list()] == ["o-1"]
    # The same as decoding what the store loads.
    assert record_of(loaded(store, "o-1")).journal == read(store, "o-1").journal


# -- ctx.idempotency_key ------------------------------------------------------------------


def test_every_run_has_its_own_idempotency_key(store: Store, run: Run) -> None:
    check_idempotency_keys(Executor(store=store), run)


def test_idempotency_keys_without_a_store(run: Run) -> None:
    check_idempotency_keys(Executor(), run)


def check_idempotency_keys(executor: Executor, run: Run) -> None:
    saga_ids: list[str | None] = ["k-1", "k-2", None, None]  # None: a uuid4 each
    for saga_id in saga_ids:
        with pytest.raises(OutOfStock):
            run(executor, Trip(fail_car=True), saga_id=saga_id)
    keys = [line.split(" ")[1] for line in LOG if line != "no upgrade"]
    assert len(keys) == 4 * 7  # 5 runs and 2 compensations each
    assert len(set(keys)) == len(keys)
    assert keys[:7] == [f"k-1/{n}" for n in range(7)]


# -- the executor's arguments -------------------------------------------------------------


def test_a_store_must_be_a_store() -> None:
    thing = object()
    with pytest.raises(
        UsageError, match=exactly(f"store must be a declsaga store, got {thing!r} (object).")
    ):
        Executor(store=thing)  # type: ignore[arg-type]


def test_recover_needs_a_store() -> None:
    message = "{}() needs an executor with a store: Executor(store=...)."
    with pytest.raises(UsageError, match=exactly(message.format("recover"))):
        Executor().recover()
    with pytest.raises(UsageError, match=exactly(message.format("recover_async"))):
        asyncio.run(Executor().recover_async())


def test_recover_inside_a_running_loop_points_to_recover_async(store: Store) -> None:
    crash(store, 2, blocking, PlaceOrder(order_id="o-1"), "o-1")

    async def main() -> None:
        with pytest.raises(
            SagaError,
            match=exactly(
                "recover() blocks, but it was called from a running event loop: use "
                "'await executor.recover_async()' instead."
            ),
        ):
            Executor(store=store).recover()

    asyncio.run(main())
    assert store.unfinished() == ["o-1"]


# -- more resuming ------------------------------------------------------------------------


def test_async_actions_and_compensators_with_nested_calls_resume(
    store: Store, run: Run, recover: Recover
) -> None:
    async def step_a(ctx: Context) -> str:
        LOG.append(f"a {ctx.idempotency_key}")
        return "a"

    async def undo_a(ctx: Context) -> None:
        LOG.append(f"undo_a {ctx.idempotency_key}")
        note = await ctx.run_async("notify")
        LOG.append(f"undo_a got {note}")
        await ctx.run_async("notify")

    async def notify(ctx: Context) -> str:
        LOG.append(f"notify {ctx.idempotency_key}")
        return f"noted {ctx.idempotency_key}"

    async def step_b(ctx: Context) -> None:
        LOG.append(f"b {ctx.idempotency_key}")
        raise OutOfStock("b")

    setup = declsaga.new(
        {"a": step_a, "b": step_b, "undo_a": undo_a, "notify": notify},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
        name="durable.async-resume",
    )
    # Commits: 1 a, 2 b, 3 b failed + undo_a started, 4 notify started, 5 notify ok,
    # 6 notify started: dying there, undo_a runs again and its first call is replayed.
    crash(store, 6, run, setup, "a-1")
    assert LOG == ["a a-1/0", "b a-1/1", "undo_a a-1/2", "notify a-1/3", "undo_a got noted a-1/3"]
    del LOG[:]
    [recovered] = recover(Executor(store=store))
    assert LOG == ["undo_a a-1/2", "undo_a got noted a-1/3", "notify a-1/4"]
    assert (recovered.status, type(recovered.error)) == ("compensated", OutOfStock)
    assert recovered.report is not None
    assert names(recovered.report.runs) == ["a", "b", "notify", "notify", "undo_a"]


def test_concurrent_recoveries_finish_each_saga_once(store: Store) -> None:
    for n in range(6):
        crash(store, 2, blocking, PlaceOrder(order_id=f"o-{n}"), f"o-{n}")  # reserve in flight
    del LOG[:]
    results: list[list[Recovered]] = []
    start = threading.Barrier(3)

    def recovering() -> None:
        start.wait(10)
        results.append(Executor(store=store).recover())

    threads = [threading.Thread(target=recovering) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    finished = sorted(one.saga_id for result in results for one in result)
    assert finished == [f"o-{n}" for n in range(6)]
    assert sorted(LOG) == sorted(
        f"{action} o-{n}/{run}"
        for n in range(6)
        for run, action in enumerate(["reserve", "charge", "ship"])
    )
    assert store.unfinished() == []


def test_a_recorded_error_never_imports_its_module(
    store: Store, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "durable_errors_module.py").write_text(
        "class Refused(Exception):\n    pass\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refused: type[Exception] = importlib.import_module("durable_errors_module").Refused

    def refuse(ctx: Context) -> None:
        raise refused("no")

    setup = declsaga.new({"a": refuse}, name="durable.refused-import")
    with pytest.raises(refused):
        run(Executor(store=store), setup, saga_id="i-1")
    monkeypatch.delitem(sys.modules, "durable_errors_module")  # a fresh process
    with pytest.raises(RecordedError, match=exactly("durable_errors_module.Refused: no")):
        run(Executor(store=store), setup, saga_id="i-1")
    assert "durable_errors_module" not in sys.modules


def test_sync_actions_reach_async_ones_under_durable_asyncio_entry_points(
    store: Store, recover: Recover
) -> None:
    """Under execute_async and recover_async, a sync step runs in a worker thread and its
    blocking ctx.run of an async action goes through the caller's loop, whichever worker
    thread the execution was set up on."""

    def sync_step(ctx: Context) -> str:
        LOG.append(f"sync_step {ctx.idempotency_key}")
        return str(ctx.run("async_call"))

    async def async_call(ctx: Context) -> str:
        LOG.append(f"async_call {ctx.idempotency_key}")
        return "called"

    setup = declsaga.new(
        {"first": compensable("first"), "sync_step": sync_step, "async_call": async_call},
        sequence=["first", "sync_step"],
        name="durable.sync-to-async",
    )
    executor = Executor(store=store)
    for n in range(5):
        report = asyncio.run(executor.execute_async(setup, saga_id=f"e-{n}"))
        assert names(report.runs) == ["first", "async_call", "sync_step"]
    for n in range(5):
        with pytest.raises(StoreError, match=exactly(CRASH)):
            Executor(store=Crashing(store, 1, landed=True)).execute(setup, saga_id=f"c-{n}")
    del LOG[:]
    recovered = recover(Executor(store=store))
    assert [(one.saga_id, one.status, one.error) for one in recovered] == [
        (f"c-{n}", "completed", None) for n in range(5)
    ]
    assert [
        line
        for n in range(5)
        for line in [f"first c-{n}/0", f"sync_step c-{n}/1", f"async_call c-{n}/2"]
    ] == LOG


# -- a journal this version cannot read ----------------------------------------------------


def test_a_journal_entry_of_an_unknown_kind_is_refused_and_kept(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    setup = logging_setup("durable.unknown-entry", ["a", "b"])
    definition = identify(setup).definition
    claim = store.claim("u-1")
    assert claim is not None
    header = SagaHeader(
        "u-1", "durable.unknown-entry", definition.fingerprint, definition.as_json(), None
    )
    entries = ({"kind": "saga_started", "at": 1.0}, {"kind": "teleported", "at": 2.0})
    store.append(claim, Commit(0, entries, None, header))
    store.release(claim)
    before = loaded(store, "u-1")
    message = (
        "Saga 'u-1' has a journal entry of an unknown kind: {'kind': 'teleported', 'at': 2.0}."
    )

    with caplog.at_level(logging.WARNING, logger="declsaga"):
        recovered = Executor(store=store).recover()
    assert [(r.saga_id, r.status, r.report, r.refused) for r in recovered] == [
        ("u-1", "running", None, f"{message} It is left untouched.")
    ]
    assert [record.getMessage() for record in caplog.records] == [recovered[0].refused]
    with pytest.raises(StoreError, match=exactly(message)):
        Executor(store=store).execute(setup, saga_id="u-1")
    with pytest.raises(StoreError, match=exactly(message)):
        readable(store).get("u-1")
    assert loaded(store, "u-1") == before  # nothing lost, nothing changed
    assert LOG == []  # nothing ran


def test_a_claim_won_while_execute_async_is_cancelled_is_given_back(tmp_path: Path) -> None:
    """The claim call runs to its end in a worker thread even when the task is cancelled
    meanwhile; the claim it won must not stay held by nobody."""
    store = SQLiteStore(tmp_path / "claims.db")
    claiming, proceed = threading.Event(), threading.Event()

    class SlowClaims(SQLiteStore):
        def claim(self, saga_id: str) -> Claim | None:
            claiming.set()
            proceed.wait(5)
            return super().claim(saga_id)

    slow = SlowClaims(tmp_path / "claims.db")
    setup = logging_setup("durable.cancelled-claim", ["a"])

    async def main() -> None:
        task = asyncio.ensure_future(Executor(store=slow).execute_async(setup, saga_id="c-1"))
        await asyncio.get_running_loop().run_in_executor(None, claiming.wait, 5)
        task.cancel()
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert LOG == []  # nothing ran
    claim = store.claim("c-1")  # not left held by the cancelled execution
    assert claim is not None
    store.release(claim)
    slow.close()
    store.close()


# -- recovering many sagas at once --------------------------------------------------------


def recover_at_once(executor: Executor, mode: str, concurrency: int) -> list[Recovered]:
    if mode == "recover":
        return executor.recover(concurrency=concurrency)
    return asyncio.run(executor.recover_async(concurrency=concurrency))


@pytest.mark.parametrize("mode", ["recover", "recover_async"])
def test_recovering_many_sagas_at_once(store: Store, mode: str) -> None:
    ids = [f"o-{i:02}" for i in range(12)]
    for i, saga_id in enumerate(ids):
        amount = 200 if i % 3 == 0 else 10  # above 100, `ship` fails: a rollback
        crash(store, 2, blocking, PlaceOrder(order_id=saga_id, amount=amount), saga_id)
    del LOG[:]
    recovered = recover_at_once(Executor(store=store), mode, concurrency=4)
    assert [one.saga_id for one in recovered] == ids  # in the order of unfinished()
    for i, one in enumerate(recovered):
        assert one.status == ("compensated" if i % 3 == 0 else "completed"), one
        ran = [line.split()[0] for line in LOG if line.split()[1].startswith(f"{one.saga_id}/")]
        # The step in flight at the crash runs again, then the rest, each once.
        rest = ["charge", "ship", "release"] if i % 3 == 0 else ["charge", "ship"]
        assert ran == ["reserve", *rest], (one.saga_id, ran)
    assert store.unfinished() == []


class FailsFor(Delegate):
    """Its appends for one saga fail, as a store that breaks in the middle of recovery."""

    def __init__(self, inner: Store, saga_id: str) -> None:
        super().__init__(inner)
        self.saga_id = saga_id

    def append(self, claim: Claim, commit: Commit) -> None:
        if claim.saga_id == self.saga_id:
            raise StoreError(CRASH)
        self.inner.append(claim, commit)


@pytest.mark.parametrize("mode", ["recover", "recover_async"])
def test_a_store_failure_stops_a_recovery_at_once(store: Store, mode: str) -> None:
    ids = [f"o-{i:02}" for i in range(8)]
    for saga_id in ids:
        crash(store, 2, blocking, PlaceOrder(order_id=saga_id), saga_id)
    with pytest.raises(StoreError, match=exactly(CRASH)):
        recover_at_once(Executor(store=FailsFor(store, "o-03")), mode, concurrency=2)
    unfinished = store.unfinished()
    assert "o-03" in unfinished  # left as it was, for the next recovery
    # No saga starts after the failure: at most the other worker's saga was running.
    assert len(unfinished) >= len(ids) - 4
    assert [one.saga_id for one in Executor(store=store).recover()] == unfinished


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True, "2"])
def test_recover_refuses_a_bad_concurrency(store: Store, concurrency: Any) -> None:
    message = exactly(f"concurrency must be an int of at least 1, got {concurrency!r}.")
    with pytest.raises(ValueError, match=message):
        Executor(store=store).recover(concurrency=concurrency)
    with pytest.raises(ValueError, match=message):
        asyncio.run(Executor(store=store).recover_async(concurrency=concurrency))
