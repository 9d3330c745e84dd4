"""SPEC §4 (the Executor) and §6 (Report, ActionRun), end to end.

Most tests run four to eight ways: a setup built with `new()` or as a `Saga` subclass
(`build`), run by `execute` or `execute_async` (`run`), with sync or async actions
(`kind`). Orders are compared as whole lists; errors as whole messages and by identity.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import attrs
import pytest

import declsaga
from declsaga import (
    ActionNotFound,
    ActionRun,
    CompensationFailed,
    CompensationTimeout,
    Context,
    EmptyActionName,
    Executor,
    Report,
    Saga,
    SagaError,
    UsageError,
    action,
    compensates,
    step,
)

if TYPE_CHECKING:
    from conftest import Act, Build, Run

pytestmark = pytest.mark.usefixtures("no_async_leaks")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def names(runs: Sequence[ActionRun]) -> list[str]:
    return [run.action for run in runs]


def run_named(report: Report, name: str) -> ActionRun:
    [found] = [run for run in report.runs if run.action == name]
    return found


class Reports(list[Report]):
    """A reporter that keeps what it is given."""

    def __call__(self, report: Report) -> None:
        self.append(report)


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Yield to the loop until `predicate()` holds (for state that threads change)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def spin(turns: int = 10) -> None:
    """Let the loop run a few iterations, so that pending callbacks and wake-ups happen."""
    for _ in range(turns):
        await asyncio.sleep(0)


# -- a DSL saga written as users write it ---------------------------------------------------


class InsufficientFunds(Exception):
    def __init__(self, account: str, missing: int) -> None:
        self.account = account
        self.missing = missing
        super().__init__(f"Account {account} misses {missing}.")


class Transfer(Saga):
    amount: int
    balance: int = 10
    log: list[str] = attrs.field(factory=list)

    @step(order=1)
    def debit(self, ctx: Context) -> None:
        self.log.append("debit")
        if self.amount > self.balance:
            raise InsufficientFunds("src", self.amount - self.balance)
        self.balance -= self.amount

    @compensates("debit")
    async def refund(self, ctx: Context) -> None:
        self.log.append("refund")
        self.balance += self.amount

    @step(order=2)
    async def credit(self, ctx: Context) -> None:
        self.log.append("credit")
        await ctx.run_async("audit")

    @compensates("credit", name="take_back")
    def uncredit(self, ctx: Context) -> None:
        self.log.append("take_back")

    @step(order=3)
    def notify(self, ctx: Context) -> None:
        self.log.append("notify")
        if self.amount == 7:
            raise RuntimeError("mail server down")

    @action
    async def audit(self, ctx: Context) -> str:
        self.log.append("audit")
        return "audited"


def test_a_dsl_saga_runs_its_steps_in_order_with_its_fields(run: Run) -> None:
    saga = Transfer(amount=3)
    report = run(Executor(), saga)
    assert saga.log == ["debit", "credit", "audit", "notify"]
    assert saga.balance == 7
    assert names(report.runs) == ["debit", "audit", "credit", "notify"]
    assert report.error is None


def test_a_dsl_saga_rolls_back_with_its_compensators(run: Run) -> None:
    saga = Transfer(amount=7)
    with pytest.raises(RuntimeError, match=exactly("mail server down")):
        run(Executor(), saga)
    assert saga.log == ["debit", "credit", "audit", "notify", "take_back", "refund"]
    assert saga.balance == 10


def test_a_dsl_saga_raises_the_actions_own_exception(run: Run) -> None:
    saga = Transfer(amount=30)
    with pytest.raises(InsufficientFunds) as raised:
        run(Executor(), saga)
    assert (raised.value.account, raised.value.missing) == ("src", 20)
    assert saga.log == ["debit"]


# -- §4.1 validation ------------------------------------------------------------------------


INVALID = [
    (["a", "missing", "b"], {}, ActionNotFound,
     "No action named 'missing' (in the sequence)."),
    (["a", "b"], {"b": "undo"}, ActionNotFound,
     "No action named 'undo' (the compensator of 'b')."),
    (["a", " "], {}, EmptyActionName,
     "The action name at position 1 of the sequence is empty: ' '."),
]  # fmt: skip


@pytest.mark.parametrize("case", INVALID)
def test_a_setup_that_fails_validation_runs_nothing_and_is_not_reported(
    run: Run, act: Act, log: list[str], case: tuple[list[str], dict[str, str], type[Exception], str]
) -> None:
    sequence, compensators, error, message = case
    reports = Reports()
    setup = declsaga.new(
        {"a": act("a"), "b": act("b"), " ": act(" ")}, sequence=sequence, compensators=compensators
    )
    with pytest.raises(error, match=exactly(message)):
        run(Executor(reporter=reports), setup)
    assert log == []
    assert reports == []


# -- §4.2 order and recording ---------------------------------------------------------------


def test_the_sequence_runs_in_order_and_runs_are_recorded_in_completion_order(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    setup = build(
        {
            "a": act("a", calls=["x"]),
            "b": act("b", calls=["y", "x"]),
            "x": act("x", calls=["z"]),
            "y": act("y"),
            "z": act("z"),
        },
        sequence=["a", "b"],
    )
    report = run(Executor(), setup)
    assert log == ["a", "x", "z", "b", "y", "x", "z"]
    assert names(report.runs) == ["z", "x", "a", "y", "z", "x", "b"]
    assert report.error is None


def test_sync_and_async_actions_mix_freely(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    setup = build(
        {
            "a": act("a", calls=["x"], catch=True, kind="sync"),
            "b": act("b", calls=["y"], kind="async"),
            "x": act("x", calls=["y"], kind="async"),
            "y": act("y", calls=["z"], kind="sync"),
            "z": act("z", kind="async", raises=ValueError("z failed")),
            "undo_a": act("undo_a", kind="async"),
            "undo_y": act("undo_y", kind="sync"),
        },
        sequence=["a", "b"],
        compensators={"a": "undo_a", "y": "undo_y"},
    )
    with pytest.raises(ValueError, match=exactly("z failed")):
        run(Executor(), setup)
    assert log == ["a", "x", "y", "z", "a caught z failed", "b", "y", "z", "undo_a"]


# -- §4.3 the rollback ----------------------------------------------------------------------


def test_the_rollback_compensates_succeeded_runs_newest_first(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    failure = ValueError("d failed")
    reports = Reports()
    setup = build(
        {
            "a": act("a"),
            "b": act("b"),
            "c": act("c"),
            "d": act("d", raises=failure),
            "e": act("e"),
            "undo_a": act("undo_a"),
            "undo_c": act("undo_c"),
            "undo_d": act("undo_d"),
        },
        sequence=["a", "b", "c", "d", "e"],
        compensators={"a": "undo_a", "c": "undo_c", "d": "undo_d"},
    )
    with pytest.raises(ValueError) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value is failure
    # b has no compensator, d failed (never compensated), e never ran.
    assert log == ["a", "b", "c", "d", "undo_c", "undo_a"]
    [report] = reports
    assert names(report.runs) == ["a", "b", "c", "d", "undo_c", "undo_a"]
    assert names(report.compensated) == ["a", "c"]
    assert report.error is failure


def test_nested_runs_are_compensated_those_of_the_failing_step_too_failed_ones_never(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    failure = ValueError("b failed")
    setup = build(
        {
            "a": act("a", calls=["x"]),
            "b": act("b", calls=["y", "z"], catch=True, raises=failure),
            "x": act("x"),
            "y": act("y"),
            "z": act("z", raises=RuntimeError("z failed")),
            "undo_a": act("undo_a"),
            "undo_b": act("undo_b"),
            "undo_x": act("undo_x"),
            "undo_y": act("undo_y"),
            "undo_z": act("undo_z"),
        },
        sequence=["a", "b"],
        compensators={"a": "undo_a", "b": "undo_b", "x": "undo_x", "y": "undo_y", "z": "undo_z"},
    )
    with pytest.raises(ValueError) as raised:
        run(Executor(), setup)
    assert raised.value is failure
    assert log == ["a", "x", "b", "y", "z", "b caught z failed", "undo_y", "undo_a", "undo_x"]


def test_an_action_that_succeeded_twice_is_compensated_twice(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    reports = Reports()
    setup = build(
        {
            "a": act("a", calls=["x", "x"]),
            "b": act("b", raises=ValueError("b failed")),
            "x": act("x"),
            "undo_x": act("undo_x"),
        },
        sequence=["a", "b"],
        compensators={"x": "undo_x"},
    )
    with pytest.raises(ValueError, match=exactly("b failed")):
        run(Executor(reporter=reports), setup)
    assert log == ["a", "x", "x", "b", "undo_x", "undo_x"]
    [report] = reports
    first_x, second_x, _, _, first_undo, second_undo = report.runs
    assert names(report.runs) == ["x", "x", "a", "b", "undo_x", "undo_x"]
    assert second_x.compensated_by is first_undo
    assert first_x.compensated_by is second_undo


def test_compensators_and_their_nested_runs_are_never_compensated(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    setup = build(
        {
            "a": act("a"),
            "b": act("b", raises=ValueError("b failed")),
            "undo_a": act("undo_a", calls=["x"]),
            "x": act("x"),
            "undo_x": act("undo_x"),
            "undo_undo_a": act("undo_undo_a"),
        },
        sequence=["a", "b"],
        compensators={"a": "undo_a", "undo_a": "undo_undo_a", "x": "undo_x"},
    )
    with pytest.raises(ValueError, match=exactly("b failed")):
        run(Executor(), setup)
    assert log == ["a", "b", "undo_a", "x"]


def test_a_failing_first_step_has_nothing_to_roll_back(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    failure = ValueError("a failed")
    reports = Reports()
    setup = build(
        {"a": act("a", raises=failure), "b": act("b"), "undo_a": act("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(ValueError) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value is failure
    assert log == ["a"]
    assert names(reports[0].runs) == ["a"]


# -- §4.4 a compensator that raises -------------------------------------------------------


def test_a_compensator_that_raises_stops_the_rollback(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    failure = ValueError("c failed")
    broken = RuntimeError("undo_b failed")
    reports = Reports()
    setup = build(
        {
            "a": act("a"),
            "b": act("b"),
            "c": act("c", raises=failure),
            "undo_a": act("undo_a"),
            "undo_b": act("undo_b", raises=broken),
        },
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )
    message = "The rollback after ValueError(c failed) failed with RuntimeError(undo_b failed)."
    with pytest.raises(CompensationFailed, match=exactly(message)) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value.action_error is failure
    assert raised.value.error is broken
    assert raised.value.__cause__ is broken
    assert log == ["a", "b", "c", "undo_b"]
    [report] = reports
    assert report.error is raised.value
    assert names(report.runs) == ["a", "b", "c", "undo_b"]
    assert [run.error for run in report.runs] == [None, None, failure, broken]
    assert report.compensated == ()


# -- §4.5 the compensation budget -----------------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [0, 0.0, -1, -0.5, math.nan, -math.inf, True, False, "1", None, [1],
     timedelta(0), timedelta(seconds=-1)],
)  # fmt: skip
def test_compensate_timeout_must_be_positive_seconds_inf_or_a_positive_timedelta(
    timeout: Any,
) -> None:
    message = (
        "compensate_timeout must be a number of seconds > 0, math.inf, or a positive "
        f"timedelta, got {timeout!r} ({type(timeout).__qualname__})."
    )
    with pytest.raises(ValueError, match=exactly(message)):
        Executor(compensate_timeout=timeout)


@pytest.mark.parametrize(
    "timeout", [1, 0.001, math.inf, timedelta(seconds=2), timedelta(microseconds=1)]
)
def test_compensate_timeout_accepts_positive_numbers_inf_and_timedeltas(timeout: Any) -> None:
    Executor(compensate_timeout=timeout)
    declsaga.execute(declsaga.new({"a": lambda ctx: None}), compensate_timeout=timeout)


def test_the_default_compensate_timeout_is_ten_seconds() -> None:
    assert declsaga.DEFAULT_COMPENSATE_TIMEOUT == 10.0
    assert repr(Executor()) == "<Executor compensate_timeout=10s>"


def test_one_budget_covers_the_whole_rollback(run: Run, kind: str, log: list[str]) -> None:
    # Each compensator alone fits in the budget; together they do not.
    def undo(name: str) -> Callable[[Context], Any]:
        def sync_undo(ctx: Context) -> None:
            log.append(name)
            time.sleep(0.1)
            log.append(f"{name} done")

        async def async_undo(ctx: Context) -> None:
            log.append(name)
            await asyncio.sleep(0.1)
            log.append(f"{name} done")

        return async_undo if kind == "async" else sync_undo

    def boom(ctx: Context) -> None:
        raise ValueError("boom")

    reports = Reports()
    setup = declsaga.new(
        {"a": lambda ctx: None, "b": lambda ctx: None, "c": boom,
         "undo_a": undo("undo_a"), "undo_b": undo("undo_b")},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip
    executor = Executor(compensate_timeout=timedelta(milliseconds=150), reporter=reports)
    started = time.perf_counter()
    with pytest.raises(CompensationFailed) as raised:
        run(executor, setup)
    assert time.perf_counter() - started < 0.5
    timeout = raised.value.error
    assert isinstance(timeout, CompensationTimeout)
    assert str(timeout) == (
        "The rollback ran out of its 0.15s budget while compensating action 'a' with 'undo_a'."
    )
    assert (timeout.action, timeout.compensator, timeout.timeout) == ("a", "undo_a", 0.15)
    assert log[:3] == ["undo_b", "undo_b done", "undo_a"]
    [report] = reports
    assert names(report.runs) == ["a", "b", "c", "undo_b", "undo_a"]
    assert report.runs[-1].error is timeout
    assert names(report.compensated) == ["b"]


def test_a_rollback_with_nothing_to_compensate_never_times_out(run: Run) -> None:
    # The budget counts compensations only: slow steps and an empty rollback do not use it.
    failure = ValueError("boom")

    def slow(ctx: Context) -> None:
        time.sleep(0.03)

    def boom(ctx: Context) -> None:
        time.sleep(0.03)
        raise failure

    setup = declsaga.new(
        {"slow": slow, "boom": boom, "undo_boom": lambda ctx: None},
        sequence=["slow", "boom"],
        compensators={"boom": "undo_boom"},
    )
    with pytest.raises(ValueError) as raised:
        run(Executor(compensate_timeout=0.01), setup)
    assert raised.value is failure


def test_the_budget_does_not_count_the_forward_steps(run: Run, kind: str, log: list[str]) -> None:
    failure = ValueError("boom")

    def slow(ctx: Context) -> None:
        time.sleep(0.1)

    async def async_undo(ctx: Context) -> None:
        log.append("undo_a")

    def sync_undo(ctx: Context) -> None:
        log.append("undo_a")

    def boom(ctx: Context) -> None:
        raise failure

    setup = declsaga.new(
        {"a": lambda ctx: None, "slow": slow, "boom": boom,
         "undo_a": async_undo if kind == "async" else sync_undo},
        sequence=["a", "slow", "boom"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(ValueError) as raised:
        run(Executor(compensate_timeout=0.05), setup)
    assert raised.value is failure
    assert log == ["undo_a"]


def test_an_async_compensator_is_cancelled_when_the_budget_runs_out(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    seen: list[BaseException] = []

    async def undo_a(ctx: Context) -> None:
        log.append("undo_a")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as cancelled:
            seen.append(cancelled)
            raise

    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(compensate_timeout=0.05, reporter=reports), setup)
    assert str(raised.value) == (
        "The rollback after ValueError(b failed) failed with CompensationTimeout(The rollback "
        "ran out of its 0.05s budget while compensating action 'a' with 'undo_a'.)."
    )
    assert log == ["a", "b", "undo_a"]
    assert len(seen) == 1
    assert isinstance(seen[0], asyncio.CancelledError)
    [report] = reports
    assert names(report.runs) == ["a", "b", "undo_a"]
    assert report.runs[-1].error is raised.value.error
    assert report.error is raised.value
    gc.collect()  # nothing was left pending on a loop


def test_an_async_compensator_waiting_on_a_sync_nested_run_is_cancelled_at_once(
    build: Build, run: Run, act: Act, log: list[str], gate: threading.Event
) -> None:
    # The nested sync run cannot be stopped, but the compensator is not kept waiting for it.
    seen: list[BaseException] = []

    async def undo_a(ctx: Context) -> None:
        try:
            await ctx.run_async("stuck")
        except asyncio.CancelledError as cancelled:
            seen.append(cancelled)
            raise

    def stuck(ctx: Context) -> None:
        log.append("stuck")
        gate.wait(5)

    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a,
         "stuck": stuck},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(compensate_timeout=0.05), setup)
    assert time.perf_counter() - started < 1
    assert isinstance(raised.value.error, CompensationTimeout)
    assert log == ["a", "b", "stuck"]
    assert len(seen) == 1
    assert isinstance(seen[0], asyncio.CancelledError)
    gc.collect()  # nothing was left pending on a loop


def test_a_sync_compensator_is_abandoned_and_its_late_outcome_discarded(
    build: Build, run: Run, act: Act, log: list[str], gate: threading.Event
) -> None:
    late: list[BaseException] = []
    finished = threading.Event()

    def undo_a(ctx: Context) -> str:
        log.append("undo_a")
        gate.wait(5)
        try:
            ctx.run("x")
        except BaseException as error:
            late.append(error)
        finished.set()
        return "too late"

    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a,
         "x": act("x")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(compensate_timeout=0.05, reporter=reports), setup, saga_id="s-1")
    assert time.perf_counter() - started < 1
    gate.set()
    assert finished.wait(5)
    [refused] = late
    assert type(refused) is SagaError
    assert str(refused) == (
        "ctx.run() was called after the run of action 'undo_a' ended (saga 's-1'); "
        "a context is valid only during its run."
    )
    assert log == ["a", "b", "undo_a"]
    [report] = reports
    assert names(report.runs) == ["a", "b", "undo_a"]
    assert report.runs[-1].error is raised.value.error
    assert isinstance(raised.value.error, CompensationTimeout)
    assert report.compensated == ()
    gc.collect()  # nothing was left pending on a loop


def test_a_sync_compensator_abandoned_while_it_runs_an_async_action(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    # The abandoned compensator's nested async run is cancelled, not left pending.
    outcome: list[BaseException] = []
    finished = threading.Event()

    def undo_a(ctx: Context) -> None:
        try:
            ctx.run("hang")
        except BaseException as error:
            outcome.append(error)
        finally:
            finished.set()

    async def hang(ctx: Context) -> None:
        log.append("hang")
        await asyncio.sleep(5)

    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a,
         "hang": hang},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    if run.mode == "execute":
        with pytest.raises(CompensationFailed):
            run(Executor(compensate_timeout=0.05), setup)
        assert finished.wait(5)
    else:

        async def main() -> None:
            with pytest.raises(CompensationFailed):
                await Executor(compensate_timeout=0.05).execute_async(setup)
            # On the caller's loop the nested run goes on; it ends when the loop does.

        asyncio.run(main())
        assert finished.wait(5)
    assert log == ["a", "b", "hang"]
    assert len(outcome) == 1
    gc.collect()  # nothing was left pending on a loop


def test_an_async_compensator_that_ignores_its_cancellation_does_not_hold_up_execute(
    build: Build, run: Run, act: Act, log: list[str], gate: threading.Event
) -> None:
    ended = threading.Event()

    async def undo_a(ctx: Context) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("undo_a cancelled")
        while not gate.is_set():  # carries on regardless, for a while
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.002)
        log.append("undo_a done")
        ended.set()

    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    executor = Executor(compensate_timeout=0.05, reporter=reports)
    if run.mode == "execute":
        started = time.perf_counter()
        with pytest.raises(CompensationFailed):
            executor.execute(setup)
        assert time.perf_counter() - started < 1
        gate.set()
    else:

        async def main() -> None:
            with pytest.raises(CompensationFailed):
                await executor.execute_async(setup)
            gate.set()
            await wait_until(ended.is_set)

        asyncio.run(main())
    assert ended.wait(5)
    assert log == ["a", "b", "undo_a cancelled", "undo_a done"]
    [report] = reports
    assert isinstance(report.runs[-1].error, CompensationTimeout)  # its late success: dropped
    time.sleep(0.01)  # the private loop closes on its daemon thread once the task ended
    gc.collect()


def test_a_compensator_whose_turn_comes_after_the_budget_is_spent_does_not_start(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    async def undo_b(ctx: Context) -> None:
        # Blocks the loop past the budget, then succeeds: the budget is spent.
        log.append("undo_b")
        time.sleep(0.08)

    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b"), "c": act("c", raises=ValueError("c failed")),
         "undo_a": act("undo_a"), "undo_b": undo_b},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(compensate_timeout=0.05, reporter=reports), setup)
    timeout = raised.value.error
    assert isinstance(timeout, CompensationTimeout)
    assert str(timeout) == (
        "The rollback ran out of its 0.05s budget while compensating action 'a' with 'undo_a'."
    )
    assert log == ["a", "b", "c", "undo_b"]
    [report] = reports
    assert names(report.runs) == ["a", "b", "c", "undo_b", "undo_a"]
    assert report.runs[-1].error is timeout
    assert report.runs[-1].runtime == timedelta(0)
    assert names(report.compensated) == ["b"]


def test_a_timedelta_budget_is_used_as_seconds(run: Run, gate: threading.Event) -> None:
    def undo_a(ctx: Context) -> None:
        gate.wait(5)

    def boom(ctx: Context) -> None:
        raise ValueError("boom")

    setup = declsaga.new(
        {"a": lambda ctx: None, "boom": boom, "undo_a": undo_a},
        sequence=["a", "boom"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(compensate_timeout=timedelta(milliseconds=20)), setup)
    assert str(raised.value.error) == (
        "The rollback ran out of its 0.02s budget while compensating action 'a' with 'undo_a'."
    )


# -- §4.6 outcomes --------------------------------------------------------------------------


def test_success_returns_the_report(build: Build, run: Run, act: Act) -> None:
    reports = Reports()
    setup = build({"a": act("a"), "b": act("b")}, sequence=["a", "b"])
    report = run(Executor(reporter=reports), setup)
    assert reports == [report]
    assert report.error is None
    assert names(report.succeeded) == ["a", "b"]


def test_a_failure_rolled_back_raises_the_actions_own_exception_object(
    build: Build, run: Run, act: Act
) -> None:
    failure = InsufficientFunds("acc-1", 5)
    setup = build(
        {"a": act("a"), "b": act("b", raises=failure), "undo_a": act("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    try:
        run(Executor(), setup)
    except InsufficientFunds as error:
        assert error is failure
    else:
        pytest.fail("the action's exception did not propagate")


@pytest.mark.parametrize("failure", [TimeoutError("slow"), KeyError("k")], ids=type)
def test_the_actions_own_exception_object_crosses_threads_and_loops(
    build: Build, run: Run, act: Act, kind: str, failure: Exception
) -> None:
    # asyncio copies a TimeoutError that crosses between concurrent and asyncio futures.
    other = "sync" if kind == "async" else "async"
    reports = Reports()
    setup = build(
        {"a": act("a", calls=["x"]), "x": act("x", calls=["y"], kind=other),
         "y": act("y", raises=failure), "undo_a": act("undo_a")},
        sequence=["a"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(type(failure)) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value is failure
    assert [run.error for run in reports[0].runs] == [failure, failure, failure]
    assert all(run.error is failure for run in reports[0].runs)


# -- §4.7 the reporter ----------------------------------------------------------------------


def test_the_reporter_is_called_once_with_what_execute_raised(
    build: Build, run: Run, act: Act
) -> None:
    calls: list[Report] = []
    failure = ValueError("b failed")

    def reporter(report: Report) -> None:
        calls.append(report)

    setup = build({"a": act("a"), "b": act("b", raises=failure)}, sequence=["a", "b"])
    with pytest.raises(ValueError):
        run(Executor(reporter=reporter), setup)
    [report] = calls
    assert report.error is failure
    assert names(report.runs) == ["a", "b"]


def test_a_reporter_error_propagates_with_the_outcome_as_context(
    build: Build, run: Run, act: Act
) -> None:
    broken = OSError("disk full")

    def reporter(report: Report) -> None:
        raise broken

    ok = build({"a": act("a")}, sequence=["a"])
    with pytest.raises(OSError) as raised:
        run(Executor(reporter=reporter), ok)
    assert raised.value is broken
    assert broken.__context__ is None

    failure = ValueError("b failed")
    failing = build({"a": act("a"), "b": act("b", raises=failure)}, sequence=["a", "b"])
    with pytest.raises(OSError) as raised:
        run(Executor(reporter=reporter), failing)
    assert raised.value is broken
    assert broken.__context__ is failure


def test_a_reporter_error_after_a_failed_rollback_has_the_compensation_failure_as_context(
    build: Build, run: Run, act: Act
) -> None:
    broken = OSError("disk full")
    seen: list[Report] = []

    def reporter(report: Report) -> None:
        seen.append(report)
        raise broken

    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b")),
         "undo_a": act("undo_a", raises=RuntimeError("undo"))},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(OSError) as raised:
        run(Executor(reporter=reporter), setup)
    assert raised.value is broken
    assert isinstance(broken.__context__, CompensationFailed)
    assert seen[0].error is broken.__context__


def test_a_reporter_error_has_the_outcome_as_context_even_inside_an_outer_handler(
    run: Run,
) -> None:
    # The context is the saga's outcome (None), not whatever the caller was handling.
    broken = OSError("disk full")

    def reporter(report: Report) -> None:
        raise broken

    executor = Executor(reporter=reporter)
    setup = declsaga.new({"a": lambda ctx: None})
    if run.mode == "execute":
        try:
            raise KeyError("outer")
        except KeyError:
            with pytest.raises(OSError):
                executor.execute(setup)
    else:

        async def main() -> None:
            try:
                raise KeyError("outer")
            except KeyError:
                with pytest.raises(OSError):
                    await executor.execute_async(setup)

        asyncio.run(main())
    assert broken.__context__ is None


def test_a_non_callable_reporter_is_a_usage_error() -> None:
    with pytest.raises(
        UsageError, match=exactly("reporter must be a callable taking a Report, got 'log' (str).")
    ):
        Executor(reporter="log")  # type: ignore[arg-type]


# -- §4.8 nested failures -------------------------------------------------------------------


def test_a_nested_failure_raises_into_the_caller_which_may_carry_on(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    setup = build(
        {
            "a": act("a", calls=["x"], catch=True),
            "b": act("b"),
            "x": act("x", raises=KeyError("x")),
            "undo_x": act("undo_x"),
        },
        sequence=["a", "b"],
        compensators={"x": "undo_x"},
    )
    report = run(Executor(), setup)
    assert log == ["a", "x", "a caught 'x'", "b"]
    assert names(report.runs) == ["x", "a", "b"]
    assert names(report.failed) == ["x"]
    assert report.error is None


def test_a_nested_failure_that_the_caller_lets_through_fails_the_step(
    build: Build, run: Run, act: Act, log: list[str]
) -> None:
    failure = KeyError("x")
    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", calls=["x"]), "x": act("x", raises=failure),
         "undo_a": act("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(KeyError) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value is failure
    assert log == ["a", "b", "x", "undo_a"]
    [report] = reports
    assert names(report.failed) == ["x", "b"]
    assert [run.error for run in report.failed] == [failure, failure]


# -- §4.9 cancellation and BaseExceptions ---------------------------------------------------


def cancelled_execution(
    setup: declsaga.Setup,
    reports: Reports,
    *,
    then: Callable[[asyncio.Task[Report]], Any],
) -> asyncio.CancelledError:
    """Run `setup` in a task, let `then(task)` cancel it, and return the CancelledError
    that execute_async raised (asserting that it propagated out of the task)."""
    caught: list[asyncio.CancelledError] = []

    async def execute() -> Report:
        try:
            return await Executor(reporter=reports).execute_async(setup)
        except asyncio.CancelledError as cancelled:
            caught.append(cancelled)
            raise

    async def main() -> None:
        task = asyncio.create_task(execute())
        await then(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    [cancelled] = caught
    return cancelled


def test_cancelling_execute_async_cancels_the_running_async_action_and_rolls_back(
    build: Build, act: Act, log: list[str]
) -> None:
    entered = asyncio.Event()

    async def hang(ctx: Context) -> None:
        log.append("hang")
        entered.set()
        await asyncio.Event().wait()

    setup = build(
        {"a": act("a"), "hang": hang, "c": act("c"), "undo_a": act("undo_a"),
         "undo_hang": act("undo_hang")},
        sequence=["a", "hang", "c"],
        compensators={"a": "undo_a", "hang": "undo_hang"},
    )  # fmt: skip

    async def cancel(task: asyncio.Task[Report]) -> None:
        await entered.wait()
        task.cancel()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "hang", "undo_a"]
    [report] = reports
    assert report.error is cancelled
    assert names(report.runs) == ["a", "hang", "undo_a"]
    assert report.runs[1].error is cancelled
    assert report.runs[0].compensated_by is report.runs[2]


def test_cancelling_a_nested_async_run_records_it_failed_too(build: Build, log: list[str]) -> None:
    entered = asyncio.Event()

    async def a(ctx: Context) -> None:
        log.append("a")
        await ctx.run_async("x")

    async def x(ctx: Context) -> None:
        log.append("x")
        entered.set()
        await asyncio.Event().wait()

    setup = build({"a": a, "x": x}, sequence=["a"])

    async def cancel(task: asyncio.Task[Report]) -> None:
        await entered.wait()
        task.cancel()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    [report] = reports
    assert names(report.runs) == ["x", "a"]
    assert [run.error for run in report.runs] == [cancelled, cancelled]


def test_a_timeout_around_execute_async_rolls_back_and_raises_timeout_error(
    build: Build, act: Act, log: list[str]
) -> None:
    # The CancelledError propagates as is (no uncancel()), so asyncio.timeout sees its own.
    entered = asyncio.Event()

    async def hang(ctx: Context) -> None:
        entered.set()
        await asyncio.Event().wait()

    setup = build(
        {"a": act("a"), "hang": hang, "undo_a": act("undo_a")},
        sequence=["a", "hang"],
        compensators={"a": "undo_a"},
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:

                async def expire() -> None:
                    await entered.wait()
                    deadline.reschedule(loop.time())

                expiry = asyncio.create_task(expire())
                await Executor().execute_async(setup)
        await expiry
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(main())
    assert log == ["a", "undo_a"]


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_cancelling_while_a_sync_step_runs_waits_for_its_real_outcome(
    build: Build, act: Act, log: list[str], gate: threading.Event, outcome: str
) -> None:
    entered = threading.Event()
    failure = RuntimeError("slow failed")

    def slow(ctx: Context) -> str:
        log.append("slow")
        entered.set()
        gate.wait(5)
        log.append(f"slow {outcome}")
        if outcome == "fails":
            raise failure
        return "done"

    setup = build(
        {"a": act("a"), "slow": slow, "c": act("c"), "undo_a": act("undo_a"),
         "undo_slow": act("undo_slow")},
        sequence=["a", "slow", "c"],
        compensators={"a": "undo_a", "slow": "undo_slow"},
    )  # fmt: skip

    async def cancel(task: asyncio.Task[Report]) -> None:
        await wait_until(entered.is_set)
        task.cancel()
        await spin()
        task.cancel()  # a second cancellation changes nothing
        await spin()
        assert not task.done()  # it waits for the thread
        assert log == ["a", "slow"]
        gate.set()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    [report] = reports
    assert report.error is cancelled
    slow_run = run_named(report, "slow")
    if outcome == "succeeds":
        assert log == ["a", "slow", "slow succeeds", "undo_slow", "undo_a"]
        assert slow_run.error is None
        assert slow_run.compensated_by is run_named(report, "undo_slow")
    else:
        assert log == ["a", "slow", "slow fails", "undo_a"]
        assert slow_run.error is failure


def test_cancelling_while_a_nested_sync_run_runs_waits_for_it_and_compensates_it(
    build: Build, log: list[str], gate: threading.Event
) -> None:
    entered = threading.Event()

    async def a(ctx: Context) -> None:
        log.append("a")
        await ctx.run_async("x")
        log.append("a after x")  # never: the cancellation is raised into a

    def x(ctx: Context) -> None:
        log.append("x")
        entered.set()
        gate.wait(5)

    def undo_x(ctx: Context) -> None:
        log.append("undo_x")

    setup = build({"a": a, "x": x, "undo_x": undo_x}, sequence=["a"], compensators={"x": "undo_x"})

    async def cancel(task: asyncio.Task[Report]) -> None:
        await wait_until(entered.is_set)
        task.cancel()
        await spin()
        assert not task.done()
        gate.set()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "x", "undo_x"]
    [report] = reports
    assert names(report.runs) == ["x", "a", "undo_x"]
    assert [run.error for run in report.runs] == [None, cancelled, None]


def test_the_rollback_is_shielded_from_further_cancellation(
    build: Build, act: Act, log: list[str]
) -> None:
    entered = asyncio.Event()
    undoing = asyncio.Event()
    release = asyncio.Event()

    async def hang(ctx: Context) -> None:
        entered.set()
        await asyncio.Event().wait()

    async def undo_a(ctx: Context) -> None:
        log.append("undo_a")
        undoing.set()
        await release.wait()
        log.append("undo_a done")

    setup = build(
        {"a": act("a"), "b": act("b"), "hang": hang, "undo_a": undo_a, "undo_b": act("undo_b")},
        sequence=["a", "b", "hang"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )

    async def cancel(task: asyncio.Task[Report]) -> None:
        await entered.wait()
        task.cancel()
        await undoing.wait()
        task.cancel()
        await spin()
        task.cancel()
        await spin()
        release.set()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "b", "undo_b", "undo_a", "undo_a done"]
    [report] = reports
    assert report.error is cancelled
    assert names(report.compensated) == ["a", "b"]


@pytest.mark.parametrize("turns", range(12))
def test_a_second_cancellation_at_any_moment_of_the_rollback_still_reports_once(
    turns: int, log: list[str]
) -> None:
    # Sweeps the moment of the second cancellation across the rollback's last loop turns,
    # including the one where the rollback has finished but its waiter has not woken up.
    entered = asyncio.Event()
    undone = asyncio.Event()

    async def hang(ctx: Context) -> None:
        entered.set()
        await asyncio.Event().wait()

    async def undo_a(ctx: Context) -> None:
        log.append("undo_a")
        undone.set()

    setup = declsaga.new(
        {"a": lambda ctx: None, "hang": hang, "undo_a": undo_a},
        sequence=["a", "hang"],
        compensators={"a": "undo_a"},
    )

    async def cancel(task: asyncio.Task[Report]) -> None:
        await entered.wait()
        task.cancel()
        await undone.wait()
        await spin(turns)
        task.cancel()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["undo_a"]
    [report] = reports
    assert report.error is cancelled


def test_a_cancellation_during_the_rollback_of_a_failure_propagates_after_it(
    build: Build, act: Act, log: list[str]
) -> None:
    undoing = asyncio.Event()
    release = asyncio.Event()

    async def undo_a(ctx: Context) -> None:
        log.append("undo_a")
        undoing.set()
        await release.wait()
        log.append("undo_a done")

    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b failed")), "undo_a": undo_a},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )

    async def cancel(task: asyncio.Task[Report]) -> None:
        await undoing.wait()
        task.cancel()
        await spin()
        release.set()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "b", "undo_a", "undo_a done"]
    [report] = reports
    assert report.error is cancelled
    assert names(report.compensated) == ["a"]


def test_a_failed_rollback_after_a_cancellation_is_the_cause_of_the_cancelled_error(
    build: Build, act: Act, log: list[str]
) -> None:
    entered = asyncio.Event()
    broken = RuntimeError("undo_b failed")

    async def hang(ctx: Context) -> None:
        entered.set()
        await asyncio.Event().wait()

    setup = build(
        {"a": act("a"), "b": act("b"), "hang": hang, "undo_a": act("undo_a"),
         "undo_b": act("undo_b", raises=broken)},
        sequence=["a", "b", "hang"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip

    async def cancel(task: asyncio.Task[Report]) -> None:
        await entered.wait()
        task.cancel()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "b", "undo_b"]
    failed = cancelled.__cause__
    assert isinstance(failed, CompensationFailed)
    assert failed.action_error is cancelled
    assert failed.error is broken
    [report] = reports
    assert report.error is cancelled


def test_a_cancellation_during_a_failed_rollback_keeps_the_failure_as_its_cause(
    build: Build, act: Act, log: list[str]
) -> None:
    undoing = asyncio.Event()
    release = asyncio.Event()
    failure = ValueError("c failed")
    broken = RuntimeError("undo_b failed")

    async def undo_b(ctx: Context) -> None:
        undoing.set()
        await release.wait()
        raise broken

    setup = build(
        {"a": act("a"), "b": act("b"), "c": act("c", raises=failure), "undo_a": act("undo_a"),
         "undo_b": undo_b},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip

    async def cancel(task: asyncio.Task[Report]) -> None:
        await undoing.wait()
        task.cancel()
        await spin()
        release.set()

    reports = Reports()
    cancelled = cancelled_execution(setup, reports, then=cancel)
    assert log == ["a", "b", "c"]
    failed = cancelled.__cause__
    assert isinstance(failed, CompensationFailed)
    assert (failed.action_error, failed.error) == (failure, broken)
    assert reports[0].error is cancelled


class Abort(BaseException):
    """A BaseException that is not an Exception, like KeyboardInterrupt."""


@pytest.mark.parametrize(
    "interrupt", [KeyboardInterrupt(), SystemExit(3), Abort("abort")], ids=type
)
def test_a_base_exception_raised_under_execute_rolls_back_then_propagates(
    build: Build, act: Act, log: list[str], interrupt: BaseException
) -> None:
    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=interrupt), "c": act("c"), "undo_a": act("undo_a")},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(type(interrupt)) as raised:
        Executor(reporter=reports).execute(setup)
    assert raised.value is interrupt
    assert log == ["a", "b", "undo_a"]
    [report] = reports
    assert report.error is interrupt
    assert names(report.runs) == ["a", "b", "undo_a"]


def test_a_keyboard_interrupt_from_outside_stops_the_async_step_before_the_rollback(
    build: Build, act: Act, log: list[str]
) -> None:
    # As a signal handler would: raised by the loop, not by the awaiting action.
    def interrupt() -> None:
        raise KeyboardInterrupt

    async def hang(ctx: Context) -> None:
        asyncio.get_running_loop().call_soon(interrupt)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("hang cancelled")
            raise

    reports = Reports()
    setup = build(
        {"a": act("a"), "hang": hang, "undo_a": act("undo_a")},
        sequence=["a", "hang"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(KeyboardInterrupt) as raised:
        Executor(reporter=reports).execute(setup)
    assert log == ["a", "hang cancelled", "undo_a"]
    [report] = reports
    assert names(report.runs) == ["a", "hang", "undo_a"]
    assert report.runs[1].error is raised.value
    assert report.error is raised.value


def test_a_keyboard_interrupt_in_a_nested_run_under_execute_rolls_back(
    build: Build, act: Act, log: list[str]
) -> None:
    interrupt = KeyboardInterrupt()
    setup = build(
        {"a": act("a"), "b": act("b", calls=["x"]), "x": act("x", raises=interrupt),
         "undo_a": act("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt) as raised:
        Executor().execute(setup)
    assert raised.value is interrupt
    assert log == ["a", "b", "x", "undo_a"]


def test_a_keyboard_interrupt_with_a_failed_rollback_has_it_as_cause(
    build: Build, act: Act, log: list[str]
) -> None:
    interrupt = KeyboardInterrupt()
    broken = RuntimeError("undo_a failed")
    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=interrupt), "undo_a": act("undo_a", raises=broken)},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(KeyboardInterrupt) as raised:
        Executor(reporter=reports).execute(setup)
    assert raised.value is interrupt
    failed = interrupt.__cause__
    assert isinstance(failed, CompensationFailed)
    assert (failed.action_error, failed.error) == (interrupt, broken)
    assert reports[0].error is interrupt


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(3)], ids=type)
def test_a_compensator_raising_a_base_exception_fails_the_rollback_like_any_error(
    build: Build, run: Run, act: Act, log: list[str], interrupt: BaseException
) -> None:
    # Sync or async, under execute or execute_async: the saga is concluded and reported.
    failure = ValueError("c failed")
    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b"), "c": act("c", raises=failure),
         "undo_a": act("undo_a"), "undo_b": act("undo_b", raises=interrupt)},
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(reporter=reports), setup)
    assert (raised.value.action_error, raised.value.error) == (failure, interrupt)
    assert log == ["a", "b", "c", "undo_b"]
    [report] = reports
    assert report.error is raised.value
    assert report.runs[-1].error is interrupt


def test_a_reporter_error_after_a_cancellation_becomes_the_cancellations_context(
    build: Build, act: Act
) -> None:
    entered = asyncio.Event()
    broken = OSError("disk full")
    reported: list[Report] = []

    async def hang(ctx: Context) -> None:
        entered.set()
        await asyncio.Event().wait()

    def reporter(report: Report) -> None:
        reported.append(report)
        raise broken

    setup = build({"a": act("a"), "hang": hang}, sequence=["a", "hang"])
    caught: list[BaseException] = []

    async def main() -> None:
        async def execute() -> None:
            try:
                await Executor(reporter=reporter).execute_async(setup)
            except BaseException as error:
                caught.append(error)
                raise

        task = asyncio.create_task(execute())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [cancelled] = caught
    assert isinstance(cancelled, asyncio.CancelledError)
    assert cancelled.__context__ is broken
    assert reported[0].error is cancelled


# -- §4.10 no per-execution state in the executor -----------------------------------------


def test_one_executor_runs_many_setups_at_once_on_threads(build: Build) -> None:
    sagas = 8
    barrier = threading.Barrier(sagas, timeout=5)
    reports = Reports()
    executor = Executor(reporter=reports)
    logs: dict[int, list[str]] = {i: [] for i in range(sagas)}

    def saga(i: int) -> declsaga.Setup:
        log = logs[i]

        def a(ctx: Context) -> None:
            log.append(f"a{i}")
            barrier.wait()  # every saga is inside its first step at once
            assert ctx.run("x") == i

        async def x(ctx: Context) -> int:
            log.append(f"x{i}")
            await asyncio.sleep(0)
            return i

        def b(ctx: Context) -> None:
            log.append(f"b{i}")
            if i % 2:
                raise ValueError(f"b{i} failed")

        def undo_a(ctx: Context) -> None:
            log.append(f"undo_a{i}")

        return build(
            {"a": a, "b": b, "x": x, "undo_a": undo_a},
            sequence=["a", "b"],
            compensators={"a": "undo_a"},
        )

    def execute(i: int) -> str:
        try:
            executor.execute(saga(i), saga_id=f"saga-{i}")
        except ValueError as error:
            return str(error)
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(sagas) as pool:
        outcomes = list(pool.map(execute, range(sagas)))
    assert outcomes == [f"b{i} failed" if i % 2 else "ok" for i in range(sagas)]
    for i in range(sagas):
        expected = [f"a{i}", f"x{i}", f"b{i}"] + ([f"undo_a{i}"] if i % 2 else [])
        assert logs[i] == expected
    assert len(reports) == sagas
    for report in reports:
        assert names(report.runs) in (["x", "a", "b"], ["x", "a", "b", "undo_a"])


def test_fifty_concurrent_execute_async_with_nested_sync_and_async_runs(build: Build) -> None:
    sagas = 50
    # Every saga blocks a worker thread at once: a bounded pool would deadlock here.
    barrier = threading.Barrier(sagas, timeout=10)
    executor = Executor()

    def saga(i: int) -> declsaga.Setup:
        async def a(ctx: Context) -> None:
            assert await ctx.run_async("s") == i * 3

        def s(ctx: Context) -> int:
            barrier.wait()
            return int(ctx.run("t")) * 3

        async def t(ctx: Context) -> int:
            await asyncio.sleep(0)
            return int(await ctx.run_async("u"))

        def u(ctx: Context) -> int:
            return i

        async def b(ctx: Context) -> str:
            if i % 5 == 0:
                raise ValueError(f"saga {i} failed")
            return ctx.saga_id

        async def undo_a(ctx: Context) -> None:
            await ctx.run_async("u")

        return build(
            {"a": a, "b": b, "s": s, "t": t, "u": u, "undo_a": undo_a},
            sequence=["a", "b"],
            compensators={"a": "undo_a"},
        )

    async def main() -> list[Report | BaseException]:
        return await asyncio.gather(
            *(executor.execute_async(saga(i), saga_id=f"saga-{i}") for i in range(sagas)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    for i, outcome in enumerate(outcomes):
        if i % 5 == 0:
            assert isinstance(outcome, ValueError)
            assert str(outcome) == f"saga {i} failed"
        else:
            assert isinstance(outcome, Report)
            assert names(outcome.runs) == ["u", "t", "s", "a", "b"]


def test_one_setup_runs_many_times_at_once(build: Build) -> None:
    # The same setup object, concurrently: every execution sees only its own saga id.
    seen: dict[str, list[str]] = {}

    async def a(ctx: Context) -> None:
        await asyncio.sleep(0)
        seen.setdefault(ctx.saga_id, []).append(str(await ctx.run_async("x")))

    def x(ctx: Context) -> str:
        return ctx.saga_id

    setup = build({"a": a, "x": x}, sequence=["a"])
    ids = [f"saga-{i}" for i in range(20)]

    async def main() -> list[Report]:
        executor = Executor()
        return await asyncio.gather(*(executor.execute_async(setup, saga_id=i) for i in ids))

    reports = asyncio.run(main())
    assert seen == {i: [i] for i in ids}
    assert [names(report.runs) for report in reports] == [["x", "a"]] * len(ids)


# -- §4.11 where actions run ----------------------------------------------------------------


def current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


Where = tuple[int, asyncio.AbstractEventLoop | None]


def where() -> Where:
    return threading.get_ident(), current_loop()


def test_under_execute_sync_actions_run_on_the_calling_thread_async_on_a_private_loop(
    build: Build,
) -> None:
    seen: dict[str, Where] = {}

    def s(ctx: Context) -> None:
        seen["s"] = where()
        ctx.run("nested_sync")
        ctx.run("nested_async")

    def nested_sync(ctx: Context) -> None:
        seen["nested_sync"] = where()

    async def nested_async(ctx: Context) -> None:
        seen["nested_async"] = where()

    async def a(ctx: Context) -> None:
        seen["a"] = where()
        await ctx.run_async("from_async")

    def from_async(ctx: Context) -> None:
        seen["from_async"] = where()

    def fail(ctx: Context) -> None:
        seen["fail"] = where()
        raise ValueError("fail")

    def undo_s(ctx: Context) -> None:
        seen["undo_s"] = where()

    setup = build(
        {"s": s, "a": a, "fail": fail, "nested_sync": nested_sync, "nested_async": nested_async,
         "from_async": from_async, "undo_s": undo_s},
        sequence=["s", "a", "fail"],
        compensators={"s": "undo_s"},
    )  # fmt: skip
    me = threading.get_ident()
    with pytest.raises(ValueError, match=r"^fail$"):
        Executor().execute(setup)
    for name in ("s", "nested_sync", "fail"):
        assert seen[name] == (me, None), name
    private = seen["a"][1]
    assert private is not None
    assert seen["nested_async"][1] is private
    assert private.is_closed()
    # Sync actions reached from an async action run in a worker thread, and so do sync
    # compensators (so that the budget can abandon them).
    for name in ("from_async", "undo_s"):
        thread, loop = seen[name]
        assert thread != me, name
        assert loop is None, name

    again: dict[str, Where] = dict(seen)
    seen.clear()
    with pytest.raises(ValueError, match=r"^fail$"):
        Executor().execute(setup)
    assert seen["a"][1] is not again["a"][1]  # each execution has its own loop


def test_under_execute_async_sync_actions_never_run_on_the_loop(build: Build) -> None:
    seen: dict[str, Where] = {}

    def s(ctx: Context) -> None:
        seen["s"] = where()
        ctx.run("nested_sync")

    def nested_sync(ctx: Context) -> None:
        seen["nested_sync"] = where()

    async def a(ctx: Context) -> None:
        seen["a"] = where()
        await ctx.run_async("from_async")

    def from_async(ctx: Context) -> None:
        seen["from_async"] = where()

    async def fail(ctx: Context) -> None:
        seen["fail"] = where()
        raise ValueError("fail")

    def undo_s(ctx: Context) -> None:
        seen["undo_s"] = where()

    setup = build(
        {"s": s, "a": a, "fail": fail, "nested_sync": nested_sync, "from_async": from_async,
         "undo_s": undo_s},
        sequence=["s", "a", "fail"],
        compensators={"s": "undo_s"},
    )  # fmt: skip

    async def main() -> Where:
        with pytest.raises(ValueError, match=r"^fail$"):
            await Executor().execute_async(setup)
        return where()

    loop_thread, loop = asyncio.run(main())
    for name in ("s", "nested_sync", "from_async", "undo_s"):
        thread, running = seen[name]
        assert thread != loop_thread, name
        assert running is None, name
    assert seen["s"][0] == seen["nested_sync"][0]  # a nested sync run stays on its thread
    for name in ("a", "fail"):
        assert seen[name] == (loop_thread, loop), name


def test_blocking_calls_from_a_worker_thread_reach_async_actions_through_the_loop(
    build: Build, run: Run
) -> None:
    seen: dict[str, Where] = {}

    async def a(ctx: Context) -> int:
        seen["a"] = where()
        return int(await ctx.run_async("s")) + 1

    def s(ctx: Context) -> int:
        seen["s"] = where()
        return int(ctx.run("inner")) * 10

    async def inner(ctx: Context) -> int:
        seen["inner"] = where()
        return 4

    reports = Reports()
    setup = build({"a": a, "s": s, "inner": inner}, sequence=["a"])
    run(Executor(reporter=reports), setup)
    assert seen["inner"] == seen["a"]  # on the executor's loop, its thread
    assert seen["s"][0] != seen["a"][0]
    assert names(reports[0].runs) == ["inner", "s", "a"]


class AsyncCallable:
    """An object with an async __call__: an async action that is not a function."""

    async def __call__(self, ctx: Context) -> object:
        return ("callable", current_loop() is not None)


def test_a_sync_callable_that_returns_an_awaitable_is_awaited_on_the_executors_loop(
    run: Run,
) -> None:
    async def work(ctx: Context, tag: str) -> object:
        return (tag, current_loop() is not None)

    def wrapper(ctx: Context) -> object:  # a plain def that returns a coroutine
        return work(ctx, "wrapper")

    results: list[object] = []

    def a(ctx: Context) -> None:
        results.extend([ctx.run("wrapper"), ctx.run("partial"), ctx.run("callable")])

    async def b(ctx: Context) -> None:
        results.extend([await ctx.run_async(name) for name in ("wrapper", "partial", "callable")])

    actions: dict[str, Callable[[Context], object]] = {
        "a": a, "b": b, "wrapper": wrapper, "partial": functools.partial(work, tag="partial"),
        "callable": AsyncCallable(),
    }  # fmt: skip
    setup = declsaga.new(
        actions,
        sequence=["a", "b"],
    )  # fmt: skip
    report = run(Executor(), setup)
    expected = [("wrapper", True), ("partial", True), ("callable", True)]
    assert results == expected + expected
    nested = ["wrapper", "partial", "callable"]
    assert names(report.runs) == [*nested, "a", *nested, "b"]


def test_execute_from_a_worker_thread_of_a_running_loop_uses_its_own_loop() -> None:
    loops: list[asyncio.AbstractEventLoop | None] = []

    async def a(ctx: Context) -> None:
        loops.append(current_loop())

    setup = declsaga.new({"a": a})

    async def main() -> None:
        loops.append(current_loop())
        await asyncio.to_thread(Executor().execute, setup)

    asyncio.run(main())
    caller, private = loops
    assert private is not None
    assert private is not caller


def test_deep_nesting_of_sync_and_async_runs_does_not_deadlock(build: Build, run: Run) -> None:
    depth = 8
    log: list[str] = []

    def level(i: int) -> Callable[[Context], Any]:
        below = f"l{i + 1}"

        def sync_level(ctx: Context) -> int:
            log.append(f"l{i}")
            return 1 + (int(ctx.run(below)) if i < depth else 0)

        async def async_level(ctx: Context) -> int:
            log.append(f"l{i}")
            return 1 + (int(await ctx.run_async(below)) if i < depth else 0)

        return async_level if i % 2 else sync_level

    results: list[int] = []

    def top(ctx: Context) -> None:
        results.append(int(ctx.run("l1")))

    actions: dict[str, Callable[[Context], Any]] = {"top": top}
    actions.update({f"l{i}": level(i) for i in range(1, depth + 1)})
    report = run(Executor(), build(actions, sequence=["top"]))
    assert results == [depth]
    assert log == [f"l{i}" for i in range(1, depth + 1)]
    assert names(report.runs) == [f"l{i}" for i in range(depth, 0, -1)] + ["top"]


def test_execute_inside_a_running_loop_points_to_execute_async(act: Act, log: list[str]) -> None:
    setup = declsaga.new({"a": act("a")})

    async def main() -> None:
        Executor().execute(setup)

    message = (
        "execute() blocks, but it was called from a running event loop: "
        "use 'await executor.execute_async(...)' instead."
    )
    with pytest.raises(SagaError, match=exactly(message)):
        asyncio.run(main())
    assert log == []


# -- §4.12 skip_validation ------------------------------------------------------------------


def test_with_skip_validation_an_unresolved_step_fails_and_earlier_steps_are_compensated(
    run: Run, act: Act, log: list[str]
) -> None:
    reports = Reports()
    setup = declsaga.new(
        {"a": act("a"), "b": act("b"), "c": act("c"), "undo_a": act("undo_a"),
         "undo_b": act("undo_b")},
        sequence=["a", "b", "missing", "c"],
        compensators={"a": "undo_a", "b": "undo_b"},
    )  # fmt: skip
    with pytest.raises(
        ActionNotFound, match=exactly("No action named 'missing' (in the sequence).")
    ):
        run(Executor(skip_validation=True, reporter=reports), setup)
    assert log == ["a", "b", "undo_b", "undo_a"]
    [report] = reports
    assert names(report.runs) == ["a", "b", "undo_b", "undo_a"]  # no run for 'missing'
    assert isinstance(report.error, ActionNotFound)


def test_with_skip_validation_an_empty_sequence_name_fails_at_run_time(
    run: Run, act: Act, log: list[str]
) -> None:
    setup = declsaga.new({"a": act("a"), "undo_a": act("undo_a")}, sequence=["a", ""],
                         compensators={"a": "undo_a"})  # fmt: skip
    with pytest.raises(ActionNotFound, match=exactly("No action named '' (in the sequence).")):
        run(Executor(skip_validation=True), setup)
    assert log == ["a", "undo_a"]


def test_with_skip_validation_an_unresolved_compensator_fails_the_rollback(
    run: Run, act: Act, log: list[str]
) -> None:
    failure = ValueError("b failed")
    setup = declsaga.new(
        {"a": act("a"), "b": act("b", raises=failure)},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(CompensationFailed) as raised:
        run(Executor(skip_validation=True), setup)
    assert raised.value.action_error is failure
    assert isinstance(raised.value.error, ActionNotFound)
    assert str(raised.value.error) == "No action named 'undo_a' (the compensator of 'a')."
    assert log == ["a", "b"]


def test_skip_validation_runs_a_valid_setup_as_usual(build: Build, run: Run, act: Act) -> None:
    report = run(Executor(skip_validation=True), build({"a": act("a")}, sequence=["a"]))
    assert names(report.runs) == ["a"]


def test_an_unresolved_compensator_of_a_nested_action_fails_at_rollback(
    run: Run, act: Act, log: list[str]
) -> None:
    # validate() only checks the sequence; x is reached through ctx.run.
    failure = ValueError("b failed")
    reports = Reports()
    setup = declsaga.new(
        {"a": act("a", calls=["x"]), "b": act("b", raises=failure), "x": act("x"),
         "undo_a": act("undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a", "x": "undo_x"},
    )  # fmt: skip
    declsaga.validate(setup)
    message = (
        "The rollback after ValueError(b failed) failed with "
        "ActionNotFound(No action named 'undo_x' (the compensator of 'x').)."
    )
    with pytest.raises(CompensationFailed, match=exactly(message)) as raised:
        run(Executor(reporter=reports), setup)
    assert raised.value.action_error is failure
    missing = raised.value.error
    assert isinstance(missing, ActionNotFound)
    assert raised.value.__cause__ is missing
    # a finished after x, so it is compensated first; then the rollback stops at x.
    assert log == ["a", "x", "b", "undo_a"]
    assert reports[0].error is raised.value


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["execute", "execute_async"])
def test_a_saga_class_instead_of_an_instance_is_a_usage_error(entry: str) -> None:
    message = (
        f"{entry}() needs a setup instance, got the class Transfer: "
        "instantiate it first, e.g. Transfer(...)."
    )
    with pytest.raises(UsageError, match=exactly(message)):
        call(entry, Transfer)


@pytest.mark.parametrize(
    ("setup", "shown"),
    [(42, "42 (int)"), ("a", "'a' (str)"), (None, "None (NoneType)"),
     ({"a": lambda ctx: None}, None)],
)  # fmt: skip
@pytest.mark.parametrize("entry", ["execute", "execute_async"])
def test_something_that_is_not_a_setup_is_a_usage_error(
    entry: str, setup: object, shown: str | None
) -> None:
    with pytest.raises(UsageError) as raised:
        call(entry, setup)
    if shown is not None:
        assert str(raised.value) == (
            f"{entry}() needs a Setup (sequence(), compensator(name), action(name)), got {shown}."
        )


@pytest.mark.parametrize(
    ("saga_id", "shown"), [(42, "42 (int)"), (b"id", "b'id' (bytes)"), ("", "'' (str)")]
)
@pytest.mark.parametrize("entry", ["execute", "execute_async"])
def test_a_saga_id_that_is_not_a_string_is_a_usage_error(
    entry: str, saga_id: object, shown: str, act: Act, log: list[str]
) -> None:
    reports = Reports()
    message = f"saga_id must be a non-empty string, got {shown}."
    with pytest.raises(UsageError, match=exactly(message)):
        call(entry, declsaga.new({"a": act("a")}), saga_id=saga_id, reporter=reports)
    assert log == []
    assert reports == []


def call(entry: str, setup: object, *, saga_id: object = None, **options: Any) -> Report:
    executor = Executor(**options)
    if entry == "execute":
        return executor.execute(setup, saga_id=saga_id)  # type: ignore[arg-type]
    return asyncio.run(executor.execute_async(setup, saga_id=saga_id))  # type: ignore[arg-type]


def test_executor_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Executor(None)  # type: ignore[call-arg]


# -- §4 saga ids and the execute() shortcut -------------------------------------------------


def test_saga_id_is_a_new_uuid4_string_when_not_given(build: Build, run: Run) -> None:
    ids: list[str] = []

    def a(ctx: Context) -> None:
        ids.append(ctx.saga_id)

    setup = build({"a": a}, sequence=["a"])
    run(Executor(), setup)
    run(Executor(), setup)
    run(Executor(), setup, saga_id="given")
    first, second, given = ids
    assert uuid.UUID(first).version == 4
    assert str(uuid.UUID(first)) == first
    assert first != second
    assert given == "given"


def test_the_execute_shortcut_passes_the_executor_options(act: Act, log: list[str]) -> None:
    reports = Reports()
    setup = declsaga.new({"a": act("a"), "b": act("b")}, sequence=["a", "b"])
    report = declsaga.execute(setup, saga_id="s-1", reporter=reports, compensate_timeout=1)
    assert reports == [report]
    assert log == ["a", "b"]
    with pytest.raises(ValueError, match=r"^compensate_timeout must be"):
        declsaga.execute(setup, compensate_timeout=0)
    with pytest.raises(TypeError):
        declsaga.execute(setup, retries=3)


# -- §6 Report and ActionRun ----------------------------------------------------------------


def test_report_times_are_aware_utc_and_end_minus_start_is_runtime(
    build: Build, run: Run, kind: str
) -> None:
    def slow(ctx: Context) -> None:
        time.sleep(0.01)
        ctx.run("nested")

    async def async_slow(ctx: Context) -> None:
        await asyncio.sleep(0.01)
        await ctx.run_async("nested")

    def fail(ctx: Context) -> None:
        raise ValueError("fail")

    reports = Reports()
    setup = build(
        {"slow": async_slow if kind == "async" else slow, "nested": lambda ctx: None,
         "fail": fail, "undo_slow": lambda ctx: None},
        sequence=["slow", "fail"],
        compensators={"slow": "undo_slow"},
    )  # fmt: skip
    before = datetime.now(UTC)
    with pytest.raises(ValueError):
        run(Executor(reporter=reports), setup)
    after = datetime.now(UTC)
    [report] = reports
    assert before <= report.start <= report.end <= after
    timed: list[Report | ActionRun] = [report, *report.runs]
    for item in timed:
        assert item.start.tzinfo is not None
        assert item.start.utcoffset() == timedelta(0)
        assert item.end.utcoffset() == timedelta(0)
        assert item.end - item.start == item.runtime
        assert item.runtime >= timedelta(0)
    for item in report.runs:
        assert report.start <= item.start <= item.end <= report.end
    slow_run = run_named(report, "slow")
    assert slow_run.runtime >= timedelta(seconds=0.01)
    # completion order: each run ends no earlier than the one recorded before it
    ends = [item.end for item in report.runs]
    assert ends == sorted(ends)


def test_report_groupings_and_compensated_by(build: Build, run: Run, act: Act) -> None:
    reports = Reports()
    failure = ValueError("c failed")
    setup = build(
        {
            "a": act("a", calls=["x", "y"], catch=True),
            "b": act("b"),
            "c": act("c", raises=failure),
            "x": act("x", raises=KeyError("x")),
            "y": act("y"),
            "undo_a": act("undo_a"),
            "undo_b": act("undo_b"),
            "undo_y": act("undo_y"),
        },
        sequence=["a", "b", "c"],
        compensators={"a": "undo_a", "b": "undo_b", "y": "undo_y"},
    )
    with pytest.raises(ValueError):
        run(Executor(reporter=reports), setup)
    [report] = reports
    assert names(report.runs) == ["x", "y", "a", "b", "c", "undo_b", "undo_a", "undo_y"]
    x, y, a, b, c, undo_b, undo_a, undo_y = report.runs
    assert report.succeeded == (y, a, b, undo_b, undo_a, undo_y)
    assert report.failed == (x, c)
    assert report.compensated == (y, a, b)
    assert (a.compensated_by, b.compensated_by, y.compensated_by) == (undo_a, undo_b, undo_y)
    for item in (x, c, undo_b, undo_a, undo_y):
        assert item.compensated_by is None
    assert c.error is failure
    assert isinstance(x.error, KeyError)
    assert report.error is failure


def test_only_a_successful_compensation_fills_compensated_by(
    build: Build, run: Run, act: Act
) -> None:
    reports = Reports()
    setup = build(
        {"a": act("a"), "b": act("b", raises=ValueError("b")),
         "undo_a": act("undo_a", raises=RuntimeError("undo_a"))},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )  # fmt: skip
    with pytest.raises(CompensationFailed):
        run(Executor(reporter=reports), setup)
    a, b, undo_a = reports[0].runs
    assert a.compensated_by is None
    assert reports[0].compensated == ()
    assert reports[0].failed == (b, undo_a)


def test_reports_and_runs_are_frozen(build: Build, run: Run, act: Act) -> None:
    report = run(Executor(), build({"a": act("a")}, sequence=["a"]))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        report.error = ValueError()  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        report.runs[0].error = ValueError()  # type: ignore[misc]
    assert isinstance(report.runs, tuple)
    assert isinstance(report.runs[0], ActionRun)


def test_a_saga_without_steps_reports_no_runs(run: Run) -> None:
    report = run(Executor(), declsaga.new({}))
    assert report.runs == ()
    assert report.error is None
    assert report.end - report.start == report.runtime
