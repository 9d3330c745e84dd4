"""The test cases of goes' own `saga` package, ported to declsaga (SPEC sections 2, 4, 6, 7).

Each section names the goes tests it ports; the few tests beyond them check what goes'
docs promise or what declsaga fixes. goes' `recorder` becomes `Recorder`: every action
appends its name to one list when it finishes, failed or not, and the tests compare that
list as a whole. Every case runs under `execute` and `execute_async`, with sync and with
async actions, unless it is about one of them only.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, timedelta
from typing import Any, Literal, Protocol, cast

import pytest

import declsaga
from declsaga import (
    ActionNotFound,
    CompensationFailed,
    CompensationTimeout,
    EmptyActionName,
    Executor,
    InvalidSetup,
    MissingBus,
    MissingRepository,
    Report,
    SagaError,
)

ActionFn = Callable[[declsaga.Context], object]
Kind = Literal["sync", "async"]


class MockError(Exception):
    """goes' `mockError`: what a failing action raises."""


class MockCompError(Exception):
    """goes' `mockCompError`: what a failing compensator raises."""


def whole(message: str) -> str:
    """A `match=` pattern for exactly `message`."""
    return f"^{re.escape(message)}$"


def names(runs: Iterable[declsaga.ActionRun]) -> list[str]:
    return [run.action for run in runs]


class Runner(Protocol):
    def __call__(
        self, executor: Executor, setup: declsaga.Setup, saga_id: str | None = None
    ) -> Report: ...


def _execute(executor: Executor, setup: declsaga.Setup, saga_id: str | None = None) -> Report:
    return executor.execute(setup, saga_id=saga_id)


def _execute_async(executor: Executor, setup: declsaga.Setup, saga_id: str | None = None) -> Report:
    return asyncio.run(executor.execute_async(setup, saga_id=saga_id))


@pytest.fixture(params=[_execute, _execute_async], ids=["execute", "execute_async"])
def run(request: pytest.FixtureRequest) -> Runner:
    return cast(Runner, request.param)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> Kind:
    return cast(Kind, request.param)


class Recorder:
    """goes' recorder: builds actions that append their name to `chain` when they finish."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.chain: list[str] = []

    def action(
        self,
        name: str,
        *,
        calls: Sequence[str] = (),
        catch: bool = False,
        error: BaseException | None = None,
        result: object = None,
        sleep: float = 0.0,
    ) -> ActionFn:
        """An action that runs `calls` in turn (ignoring their errors if `catch`), then
        sleeps, then raises `error` or returns `result`."""
        chain = self.chain
        if self.kind == "sync":

            def sync_action(ctx: declsaga.Context) -> object:
                try:
                    for callee in calls:
                        try:
                            ctx.run(callee)
                        except Exception:
                            if not catch:
                                raise
                    if sleep:
                        time.sleep(sleep)
                    if error is not None:
                        raise error
                    return result
                finally:
                    chain.append(name)

            return sync_action

        async def async_action(ctx: declsaga.Context) -> object:
            try:
                for callee in calls:
                    try:
                        await ctx.run_async(callee)
                    except Exception:
                        if not catch:
                            raise
                if sleep:
                    await asyncio.sleep(sleep)
                if error is not None:
                    raise error
                return result
            finally:
                chain.append(name)

        return async_action


def chain_setup(
    rec: Recorder, *, fail_comp: str | None, comp_error: BaseException, error: BaseException
) -> declsaga.Setup:
    """goes' compensateChain setups: foo runs bar (ignoring its error) and fails; bar runs
    baz and returns its error; every action has a compensator, `fail_comp` fails."""
    return declsaga.new(
        {
            "foo": rec.action("foo", calls=["bar"], catch=True, error=error),
            "bar": rec.action("bar", calls=["baz"]),
            "baz": rec.action("baz"),
            **{
                comp: rec.action(comp, error=comp_error if comp == fail_comp else None)
                for comp in ("comp-foo", "comp-bar", "comp-baz")
            },
        },
        compensators={"foo": "comp-foo", "bar": "comp-bar", "baz": "comp-baz"},
    )


def compensation_failed_message(action_error: BaseException, error: BaseException) -> str:
    return (
        f"The rollback after {type(action_error).__name__}({action_error}) failed with "
        f"{type(error).__name__}({error})."
    )


# -- TestExecute_implicitStartAction / TestExecute_explicitStartAction --


def test_implicit_start_runs_only_the_first_action(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    setup = declsaga.new({"foo": rec.action("foo"), "bar": rec.action("bar")})

    report = run(Executor(), setup)

    assert rec.chain == ["foo"]
    assert names(report.runs) == ["foo"]
    assert report.error is None


def test_explicit_start_with_runs_only_that_action(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    setup = declsaga.new({"foo": rec.action("foo"), "bar": rec.action("bar")}, start_with="bar")

    report = run(Executor(), setup)

    assert rec.chain == ["bar"]
    assert names(report.runs) == ["bar"]


# -- TestExecute_sequence --


def test_explicit_sequence_runs_in_its_order(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    setup = declsaga.new(
        {"foo": rec.action("foo"), "bar": rec.action("bar"), "baz": rec.action("baz")},
        sequence=["foo", "baz", "bar"],
    )

    report = run(Executor(), setup)

    assert rec.chain == ["foo", "baz", "bar"]
    assert names(report.runs) == ["foo", "baz", "bar"]
    assert names(report.succeeded) == ["foo", "baz", "bar"]
    assert report.failed == ()
    assert report.compensated == ()


# -- TestExecute_actionError --


def test_action_error_is_raised_as_the_same_object(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    setup = declsaga.new({"foo": rec.action("foo", error=error)})

    with pytest.raises(MockError, match=whole("mock error")) as caught:
        run(Executor(), setup)

    assert caught.value is error
    assert rec.chain == ["foo"]


def test_without_compensators_the_action_error_is_raised_after_the_earlier_steps(
    run: Runner, kind: Kind
) -> None:
    # goes' docs: "compensation is disabled when no compensators are configured".
    rec = Recorder(kind)
    error = MockError("mock error")
    setup = declsaga.new(
        {"foo": rec.action("foo"), "bar": rec.action("bar", error=error), "baz": rec.action("baz")},
        sequence=["foo", "bar", "baz"],
    )

    with pytest.raises(MockError) as caught:
        run(Executor(), setup)

    assert caught.value is error
    assert rec.chain == ["foo", "bar"]


# -- TestExecute_compensate --


def test_compensate_runs_the_compensator_of_the_succeeded_step(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar", error=error),
            "comp-foo": rec.action("comp-foo"),
        },
        sequence=["foo", "bar"],
        compensators={"foo": "comp-foo"},
    )

    with pytest.raises(MockError) as caught:
        run(Executor(), setup)

    assert caught.value is error
    assert rec.chain == ["foo", "bar", "comp-foo"]


def test_compensate_walks_back_from_the_failing_step(run: Runner, kind: Kind) -> None:
    # The example of goes' `saga.New` docs: the failing step itself is not compensated.
    rec = Recorder(kind)
    error = MockError("whoops")
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar"),
            "baz": rec.action("baz", error=error),
            "fix-foo": rec.action("fix-foo"),
            "fix-bar": rec.action("fix-bar"),
            "fix-baz": rec.action("fix-baz"),
        },
        sequence=["foo", "bar", "baz"],
        compensators={"foo": "fix-foo", "bar": "fix-bar", "baz": "fix-baz"},
    )

    with pytest.raises(MockError) as caught:
        run(Executor(reporter=reports.append), setup)

    assert caught.value is error
    assert rec.chain == ["foo", "bar", "baz", "fix-bar", "fix-foo"]
    [report] = reports
    assert report.error is error
    foo, bar, baz, fix_bar, fix_foo = report.runs
    assert names(report.runs) == ["foo", "bar", "baz", "fix-bar", "fix-foo"]
    assert baz.error is error
    assert foo.compensated_by is fix_foo
    assert bar.compensated_by is fix_bar
    assert baz.compensated_by is None
    assert fix_bar.compensated_by is None
    assert fix_foo.compensated_by is None
    assert report.compensated == (foo, bar)
    assert report.failed == (baz,)
    assert report.succeeded == (foo, bar, fix_bar, fix_foo)


def test_an_action_that_succeeded_twice_is_compensated_twice(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar", error=error),
            "comp-foo": rec.action("comp-foo"),
        },
        sequence=["foo", "foo", "bar"],
        compensators={"foo": "comp-foo"},
    )

    with pytest.raises(MockError):
        run(Executor(reporter=reports.append), setup)

    assert rec.chain == ["foo", "foo", "bar", "comp-foo", "comp-foo"]
    [report] = reports
    first, second, _bar, comp_second, comp_first = report.runs
    assert second.compensated_by is comp_second
    assert first.compensated_by is comp_first
    assert comp_first is not comp_second
    assert report.compensated == (first, second)


# -- TestExecute_compensateError --


def test_compensator_error_gives_compensation_failed(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    comp_error = MockCompError("mock comp error")
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar", error=error),
            "baz": rec.action("baz", error=comp_error),
        },
        sequence=["foo", "bar"],
        compensators={"foo": "baz"},
    )

    with pytest.raises(
        CompensationFailed,
        match=whole(
            "The rollback after MockError(mock error) failed with MockCompError(mock comp error)."
        ),
    ) as caught:
        run(Executor(reporter=reports.append), setup)

    failed = caught.value
    assert failed.action_error is error
    assert failed.error is comp_error
    assert failed.__cause__ is comp_error
    assert rec.chain == ["foo", "bar", "baz"]
    [report] = reports
    assert report.error is failed
    foo, bar, baz = report.runs
    assert names(report.runs) == ["foo", "bar", "baz"]
    assert (foo.error, bar.error, baz.error) == (None, error, comp_error)
    assert foo.compensated_by is None  # the compensator did not succeed
    assert report.compensated == ()
    assert report.failed == (bar, baz)


# -- TestExecute_compensateChain, ...ChainError, ...ChainErrorMiddle --


def test_compensate_chain_of_nested_runs(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = chain_setup(rec, fail_comp=None, comp_error=MockCompError("unused"), error=error)

    with pytest.raises(MockError) as caught:
        run(Executor(reporter=reports.append), setup)

    assert caught.value is error
    assert rec.chain == ["baz", "bar", "foo", "comp-bar", "comp-baz"]
    [report] = reports
    assert report.error is error
    baz, bar, foo, comp_bar, comp_baz = report.runs
    assert names(report.runs) == ["baz", "bar", "foo", "comp-bar", "comp-baz"]
    assert (baz.error, bar.error, foo.error) == (None, None, error)
    assert baz.compensated_by is comp_baz
    assert bar.compensated_by is comp_bar
    assert foo.compensated_by is None
    assert report.compensated == (baz, bar)
    assert report.failed == (foo,)


def test_compensate_chain_with_the_last_compensator_failing(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    comp_error = MockCompError("mock comp error")
    reports: list[Report] = []
    setup = chain_setup(rec, fail_comp="comp-baz", comp_error=comp_error, error=error)

    with pytest.raises(
        CompensationFailed, match=whole(compensation_failed_message(error, comp_error))
    ) as caught:
        run(Executor(reporter=reports.append), setup)

    assert caught.value.error is comp_error
    assert caught.value.action_error is error
    assert rec.chain == ["baz", "bar", "foo", "comp-bar", "comp-baz"]
    [report] = reports
    assert report.error is caught.value
    baz, bar, _foo, comp_bar, comp_baz = report.runs
    assert comp_baz.error is comp_error
    assert bar.compensated_by is comp_bar
    assert baz.compensated_by is None
    assert report.compensated == (bar,)


def test_compensate_chain_with_the_middle_compensator_failing(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    comp_error = MockCompError("mock comp error")
    reports: list[Report] = []
    setup = chain_setup(rec, fail_comp="comp-bar", comp_error=comp_error, error=error)

    with pytest.raises(
        CompensationFailed, match=whole(compensation_failed_message(error, comp_error))
    ) as caught:
        run(Executor(reporter=reports.append), setup)

    assert caught.value.error is comp_error
    assert caught.value.action_error is error
    # The failing comp-bar stops the rollback: comp-baz never runs.
    assert rec.chain == ["baz", "bar", "foo", "comp-bar"]
    [report] = reports
    assert names(report.runs) == ["baz", "bar", "foo", "comp-bar"]
    assert report.runs[3].error is comp_error
    assert report.compensated == ()


# -- TestExecute_compensatorNotFound --


def test_missing_compensator_is_caught_by_validation_before_anything_runs(
    run: Runner, kind: Kind
) -> None:
    rec = Recorder(kind)
    reports: list[Report] = []
    setup = declsaga.new(
        {"foo": rec.action("foo", error=MockError("mock error"))}, compensators={"foo": "bar"}
    )

    with pytest.raises(
        ActionNotFound, match=whole("No action named 'bar' (the compensator of 'foo').")
    ):
        run(Executor(reporter=reports.append), setup)

    assert rec.chain == []
    assert reports == []


def test_missing_compensator_with_skip_validation_fails_the_rollback(
    run: Runner, kind: Kind
) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new(
        {"foo": rec.action("foo"), "bar": rec.action("bar", error=error)},
        sequence=["foo", "bar"],
        compensators={"foo": "gone"},
    )

    with pytest.raises(CompensationFailed) as caught:
        run(Executor(reporter=reports.append, skip_validation=True), setup)

    missing = caught.value.error
    assert isinstance(missing, ActionNotFound)
    assert str(missing) == "No action named 'gone' (the compensator of 'foo')."
    assert caught.value.action_error is error
    assert str(caught.value) == compensation_failed_message(error, missing)
    assert rec.chain == ["foo", "bar"]
    [report] = reports
    assert report.error is caught.value
    assert names(report.runs) == ["foo", "bar"]


def test_unresolved_compensator_of_a_nested_action_fails_the_rollback(
    run: Runner, kind: Kind
) -> None:
    # validate() checks only the sequence's compensators: this one surfaces at rollback.
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new(
        {"foo": rec.action("foo", calls=["bar"], error=error), "bar": rec.action("bar")},
        compensators={"bar": "gone"},
    )

    with pytest.raises(
        CompensationFailed,
        match=whole(
            "The rollback after MockError(mock error) failed with "
            "ActionNotFound(No action named 'gone' (the compensator of 'bar').)."
        ),
    ) as caught:
        run(Executor(reporter=reports.append), setup)

    missing = caught.value.error
    assert isinstance(missing, ActionNotFound)
    assert caught.value.action_error is error
    assert rec.chain == ["bar", "foo"]
    [report] = reports
    assert report.error is caught.value
    assert names(report.runs) == ["bar", "foo"]
    assert report.compensated == ()


# -- goes' SkipValidation executor option --


def test_skip_validation_runs_a_setup_that_validation_rejects(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    setup = declsaga.new({"foo": rec.action("foo")}, compensators={"foo": "gone"})

    with pytest.raises(ActionNotFound):
        run(Executor(), setup)
    assert rec.chain == []

    report = run(Executor(skip_validation=True), setup)

    assert rec.chain == ["foo"]
    assert names(report.succeeded) == ["foo"]


def test_skip_validation_unknown_sequence_name_rolls_back_the_earlier_steps(
    run: Runner, kind: Kind
) -> None:
    rec = Recorder(kind)
    reports: list[Report] = []
    setup = declsaga.new(
        {"foo": rec.action("foo"), "bar": rec.action("bar"), "comp-foo": rec.action("comp-foo")},
        sequence=["foo", "missing", "bar"],
        compensators={"foo": "comp-foo"},
    )

    with pytest.raises(
        ActionNotFound, match=whole("No action named 'missing' (in the sequence).")
    ) as caught:
        run(Executor(reporter=reports.append, skip_validation=True), setup)

    assert rec.chain == ["foo", "comp-foo"]
    [report] = reports
    assert report.error is caught.value
    foo, comp_foo = report.runs  # the unknown name has no run
    assert names(report.runs) == ["foo", "comp-foo"]
    assert foo.compensated_by is comp_foo


# -- TestExecute_reportRuntime / TestExecute_reportError --


def test_report_runtime(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    reports: list[Report] = []
    setup = declsaga.new({"foo": rec.action("foo", sleep=0.05)})

    report = run(Executor(reporter=reports.append), setup)

    assert len(reports) == 1
    assert reports[0].runs == report.runs
    assert reports[0].error is None
    assert timedelta(milliseconds=50) <= report.runtime < timedelta(seconds=2)
    assert report.end - report.start == report.runtime
    assert report.start.tzinfo is not None
    assert report.start.utcoffset() == timedelta(0)
    [foo] = report.runs
    assert foo.action == "foo"
    assert foo.error is None
    assert foo.compensated_by is None
    assert timedelta(milliseconds=50) <= foo.runtime <= report.runtime
    assert foo.end - foo.start == foo.runtime
    assert report.start <= foo.start <= foo.end <= report.end
    assert foo.start.tzinfo is UTC or foo.start.utcoffset() == timedelta(0)


def test_report_error(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new({"foo": rec.action("foo", error=error)})

    with pytest.raises(MockError) as caught:
        run(Executor(reporter=reports.append), setup)

    assert caught.value is error
    [report] = reports
    assert report.error is error
    [foo] = report.runs
    assert foo.error is error
    assert report.failed == (foo,)
    assert report.succeeded == ()


def test_module_level_execute_passes_the_executor_options(kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new({"foo": rec.action("foo", error=error)})

    with pytest.raises(MockError):
        declsaga.execute(setup, saga_id="s-1", reporter=reports.append)

    [report] = reports
    assert report.error is error


# -- goes' report tests (report_test.go, action/report_test.go): groupings --


@pytest.mark.parametrize("comp_foo_fails", [False, True])
def test_report_groupings(run: Runner, kind: Kind, comp_foo_fails: bool) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    nested_error = MockError("nested")
    comp_error = MockCompError("mock comp error")
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar"),
            "baz": rec.action("baz", calls=["qux"], catch=True),
            "qux": rec.action("qux", error=nested_error),
            "foobar": rec.action("foobar", error=error),
            "comp-foo": rec.action("comp-foo", error=comp_error if comp_foo_fails else None),
            "comp-baz": rec.action("comp-baz"),
        },
        sequence=["foo", "bar", "baz", "foobar"],
        compensators={"foo": "comp-foo", "baz": "comp-baz", "qux": "comp-baz"},
    )

    with pytest.raises(CompensationFailed if comp_foo_fails else MockError):
        run(Executor(reporter=reports.append), setup)

    [report] = reports
    foo, bar, qux, baz, foobar, comp_baz, comp_foo = report.runs
    assert names(report.runs) == ["foo", "bar", "qux", "baz", "foobar", "comp-baz", "comp-foo"]
    assert baz.compensated_by is comp_baz
    assert qux.compensated_by is None  # a failed nested run is never compensated
    if comp_foo_fails:
        assert report.succeeded == (foo, bar, baz, comp_baz)
        assert report.failed == (qux, foobar, comp_foo)
        assert report.compensated == (baz,)
        assert foo.compensated_by is None
    else:
        assert report.succeeded == (foo, bar, baz, comp_baz, comp_foo)
        assert report.failed == (qux, foobar)
        assert report.compensated == (foo, baz)
        assert foo.compensated_by is comp_foo


# -- TestExecute_compensateTimeout --


def hanging_compensator(kind: Kind, release: threading.Event, events: list[str]) -> ActionFn:
    """A compensator that never finishes on its own: a sync one until `release` is set."""
    if kind == "sync":

        def sync_comp(ctx: declsaga.Context) -> None:
            events.append("started")
            release.wait(10)
            events.append("released")

        return sync_comp

    async def async_comp(ctx: declsaga.Context) -> None:
        events.append("started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    return async_comp


def test_compensate_timeout(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    release = threading.Event()
    events: list[str] = []
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar", error=error),
            "comp-foo": hanging_compensator(kind, release, events),
        },
        sequence=["foo", "bar"],
        compensators={"foo": "comp-foo"},
    )
    timeout_message = (
        "The rollback ran out of its 0.05s budget while compensating action 'foo' with 'comp-foo'."
    )

    began = time.perf_counter()
    try:
        with pytest.raises(
            CompensationFailed,
            match=whole(
                f"The rollback after MockError(mock error) failed with "
                f"CompensationTimeout({timeout_message})."
            ),
        ) as caught:
            run(Executor(reporter=reports.append, compensate_timeout=0.05), setup)
        elapsed = time.perf_counter() - began
        seen = list(events)
    finally:
        release.set()

    assert elapsed < 2.0  # raised at once, not after the compensator's 10 s
    timeout = caught.value.error
    assert isinstance(timeout, CompensationTimeout)
    assert isinstance(timeout, TimeoutError)
    assert str(timeout) == timeout_message
    assert caught.value.action_error is error
    assert caught.value.__cause__ is timeout
    if kind == "sync":
        assert "released" not in seen  # abandoned in its thread, still waiting
    else:
        assert seen == ["started", "cancelled"]
    assert rec.chain == ["foo", "bar"]
    [report] = reports
    assert report.error is caught.value
    foo, bar, comp_foo = report.runs
    assert names(report.runs) == ["foo", "bar", "comp-foo"]
    assert comp_foo.error is timeout
    assert foo.compensated_by is None
    assert report.failed == (bar, comp_foo)
    assert report.compensated == ()


def test_compensate_timeout_as_timedelta(run: Runner) -> None:
    events: list[str] = []
    release = threading.Event()
    setup = declsaga.new(
        {
            "foo": lambda ctx: None,
            "bar": Recorder("sync").action("bar", error=MockError("mock error")),
            "comp-foo": hanging_compensator("async", release, events),
        },
        sequence=["foo", "bar"],
        compensators={"foo": "comp-foo"},
    )

    with pytest.raises(CompensationFailed) as caught:
        run(Executor(compensate_timeout=timedelta(milliseconds=50)), setup)

    assert str(caught.value.error) == (
        "The rollback ran out of its 0.05s budget while compensating action 'foo' with 'comp-foo'."
    )


def test_a_compensator_whose_turn_comes_after_the_budget_is_spent_does_not_start(
    run: Runner,
) -> None:
    # comp-bar overruns the budget but finishes (it blocks its loop, so the wait cannot
    # time out first); comp-foo's turn then comes with no budget left.
    error = MockError("mock error")
    started: list[str] = []
    reports: list[Report] = []

    async def comp_bar(ctx: declsaga.Context) -> None:
        started.append("comp-bar")
        time.sleep(0.1)  # blocks the loop on purpose

    def comp_foo(ctx: declsaga.Context) -> None:
        started.append("comp-foo")

    setup = declsaga.new(
        {
            "foo": lambda ctx: None,
            "bar": lambda ctx: None,
            "baz": Recorder("sync").action("baz", error=error),
            "comp-foo": comp_foo,
            "comp-bar": comp_bar,
        },
        sequence=["foo", "bar", "baz"],
        compensators={"foo": "comp-foo", "bar": "comp-bar"},
    )

    with pytest.raises(CompensationFailed) as caught:
        run(Executor(reporter=reports.append, compensate_timeout=0.05), setup)

    timeout = caught.value.error
    assert isinstance(timeout, CompensationTimeout)
    assert str(timeout) == (
        "The rollback ran out of its 0.05s budget while compensating action 'foo' with 'comp-foo'."
    )
    assert started == ["comp-bar"]
    [report] = reports
    foo, bar, _baz, comp_bar_run, comp_foo_run = report.runs
    assert names(report.runs) == ["foo", "bar", "baz", "comp-bar", "comp-foo"]
    assert bar.compensated_by is comp_bar_run
    assert comp_foo_run.error is timeout
    assert foo.compensated_by is None


def test_the_budget_covers_the_whole_rollback(run: Runner, kind: Kind) -> None:
    # Each compensator alone fits in the budget; both together do not.
    rec = Recorder(kind)
    error = MockError("mock error")
    reports: list[Report] = []
    setup = declsaga.new(
        {
            "foo": rec.action("foo"),
            "bar": rec.action("bar"),
            "baz": rec.action("baz", error=error),
            "comp-foo": rec.action("comp-foo", sleep=0.2),
            "comp-bar": rec.action("comp-bar", sleep=0.2),
        },
        sequence=["foo", "bar", "baz"],
        compensators={"foo": "comp-foo", "bar": "comp-bar"},
    )

    with pytest.raises(CompensationFailed) as caught:
        run(Executor(reporter=reports.append, compensate_timeout=0.3), setup)

    timeout = caught.value.error
    assert isinstance(timeout, CompensationTimeout)
    assert str(timeout) == (
        "The rollback ran out of its 0.3s budget while compensating action 'foo' with 'comp-foo'."
    )
    [report] = reports
    foo, bar, _baz, comp_bar, comp_foo = report.runs
    assert names(report.runs) == ["foo", "bar", "baz", "comp-bar", "comp-foo"]
    assert bar.compensated_by is comp_bar
    assert comp_foo.error is timeout
    assert foo.compensated_by is None


def test_the_context_of_an_abandoned_compensator_refuses_further_calls(
    run: Runner, kind: Kind
) -> None:
    release = threading.Event()
    done = threading.Event()
    refused: list[BaseException] = []
    reports: list[Report] = []

    def record_refusal(caught: BaseException) -> None:
        refused.append(caught)
        done.set()

    def sync_comp(ctx: declsaga.Context) -> None:
        release.wait(10)
        try:
            ctx.run("noop")
        except BaseException as caught:
            record_refusal(caught)

    async def async_comp(ctx: declsaga.Context) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            try:
                await ctx.run_async("noop")
            except BaseException as caught:
                record_refusal(caught)
            raise

    comp_foo: ActionFn = sync_comp if kind == "sync" else async_comp
    setup = declsaga.new(
        {
            "foo": lambda ctx: None,
            "bar": Recorder("sync").action("bar", error=MockError("mock error")),
            "comp-foo": comp_foo,
            "noop": lambda ctx: None,
        },
        sequence=["foo", "bar"],
        compensators={"foo": "comp-foo"},
    )

    try:
        with pytest.raises(CompensationFailed):
            run(Executor(reporter=reports.append, compensate_timeout=0.05), setup, "s-1")
    finally:
        release.set()
    assert done.wait(5)

    method = "run" if kind == "sync" else "run_async"
    [error] = refused
    assert type(error) is SagaError
    assert str(error) == (
        f"ctx.{method}() was called after the run of action 'comp-foo' ended (saga 's-1'); "
        "a context is valid only during its run."
    )
    [report] = reports
    assert names(report.runs) == ["foo", "bar", "comp-foo"]  # the late outcome is discarded


def test_a_rollback_with_nothing_to_compensate_never_times_out(run: Runner, kind: Kind) -> None:
    rec = Recorder(kind)
    error = MockError("mock error")
    setup = declsaga.new(
        {"foo": rec.action("foo", error=error), "comp-foo": rec.action("comp-foo")},
        compensators={"foo": "comp-foo"},
    )

    with pytest.raises(MockError) as caught:
        run(Executor(compensate_timeout=1e-9), setup)

    assert caught.value is error
    assert rec.chain == ["foo"]


def test_default_compensate_timeout() -> None:
    assert declsaga.DEFAULT_COMPENSATE_TIMEOUT == 10.0


@pytest.mark.parametrize(
    ("timeout", "shown"),
    [
        (0, "0 (int)"),
        (-1.5, "-1.5 (float)"),
        (float("nan"), "nan (float)"),
        (True, "True (bool)"),
        ("1", "'1' (str)"),
        (timedelta(0), "datetime.timedelta(0) (timedelta)"),
    ],
)
def test_invalid_compensate_timeout(timeout: Any, shown: str) -> None:
    with pytest.raises(
        ValueError,
        match=whole(
            "compensate_timeout must be a number of seconds > 0, math.inf, or a positive "
            f"timedelta, got {shown}."
        ),
    ):
        Executor(compensate_timeout=timeout)


# -- TestValidate --


def noop(ctx: declsaga.Context) -> None:
    return None


@pytest.mark.parametrize(
    ("setup", "error_type", "message"),
    [
        pytest.param(
            declsaga.new({"foo": noop, "bar": noop}, sequence=["foo", "bar", "baz"]),
            ActionNotFound,
            "No action named 'baz' (in the sequence).",
            id="invalid sequence: action not found",
        ),
        pytest.param(
            declsaga.new({"   ": noop}),
            EmptyActionName,
            "The action name at position 0 of the sequence is empty: '   '.",
            id="empty name",
        ),
        pytest.param(
            declsaga.new({"": noop, "foo": noop}),
            EmptyActionName,
            "The action name at position 0 of the sequence is empty: ''.",
            id="empty first action",
        ),
        pytest.param(
            declsaga.new({"foo": noop, "   ": noop}, sequence=["foo", "   "]),
            EmptyActionName,
            "The action name at position 1 of the sequence is empty: '   '.",
            id="empty name later in the sequence",
        ),
        pytest.param(
            declsaga.new({"foo": noop}, compensators={"foo": "bar"}),
            ActionNotFound,
            "No action named 'bar' (the compensator of 'foo').",
            id="compensator not found",
        ),
        pytest.param(
            declsaga.new(
                {"foo": noop, "bar": noop},
                sequence=["foo", "bar", "gone", " "],
                compensators={"bar": "fix-bar", "foo": "fix-foo"},
            ),
            ActionNotFound,
            "No action named 'fix-foo' (the compensator of 'foo').",
            id="first problem in sequence order",
        ),
    ],
)
def test_validate(setup: declsaga.Setup, error_type: type[InvalidSetup], message: str) -> None:
    with pytest.raises(error_type, match=whole(message)) as caught:
        declsaga.validate(setup)

    assert isinstance(caught.value, InvalidSetup)
    assert isinstance(caught.value, ValueError)
    if error_type is ActionNotFound:
        assert isinstance(caught.value, LookupError)


def test_validate_accepts_a_valid_setup_and_ignores_actions_reached_only_by_ctx_run() -> None:
    setup = declsaga.new(
        {"foo": noop, "bar": noop, "fix-foo": noop},
        compensators={"foo": "fix-foo", "bar": "not-checked"},
    )
    declsaga.validate(setup)  # raises nothing

    with pytest.raises(ActionNotFound):  # the same setup with bar in the sequence
        declsaga.validate(
            declsaga.new(
                {"foo": noop, "bar": noop, "fix-foo": noop},
                sequence=["foo", "bar"],
                compensators={"foo": "fix-foo", "bar": "not-checked"},
            )
        )


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        (["foo", "bar", "baz"], "No action named 'baz' (in the sequence)."),
        (["foo", "", "bar"], "The action name at position 1 of the sequence is empty: ''."),
    ],
)
def test_execute_validates_before_anything_runs(
    run: Runner, sequence: list[str], message: str
) -> None:
    rec = Recorder("sync")
    reports: list[Report] = []
    setup = declsaga.new({"foo": rec.action("foo"), "bar": rec.action("bar")}, sequence=sequence)

    with pytest.raises(InvalidSetup, match=whole(message)):
        run(Executor(reporter=reports.append), setup)

    assert rec.chain == []
    assert reports == []


# -- TestExecute_eventBus / TestContext_Publish --


def test_publish_through_the_context(run: Runner, kind: Kind) -> None:
    bus = declsaga.InMemoryEventBus()
    subscription = bus.subscribe("foo")
    event = declsaga.Event("foo", {"n": 1})
    other = declsaga.Event("other")

    def foo(ctx: declsaga.Context) -> None:
        ctx.publish(event, other)

    async def afoo(ctx: declsaga.Context) -> None:
        await ctx.publish_async(event, other)

    run(Executor(event_bus=bus), declsaga.new({"foo": foo if kind == "sync" else afoo}))

    assert list(subscription) == [event]


def test_publish_without_an_event_bus_fails_the_action(run: Runner, kind: Kind) -> None:
    event = declsaga.Event("foo")

    def foo(ctx: declsaga.Context) -> None:
        ctx.publish(event)

    async def afoo(ctx: declsaga.Context) -> None:
        await ctx.publish_async(event)

    reports: list[Report] = []
    setup = declsaga.new({"foo": foo if kind == "sync" else afoo})

    with pytest.raises(
        MissingBus,
        match=whole(
            "Action 'foo' used the event bus, but the executor has none: "
            "pass event_bus= to Executor."
        ),
    ) as caught:
        run(Executor(reporter=reports.append), setup)

    [report] = reports
    assert report.runs[0].error is caught.value


def test_publish_error_reaches_the_action(run: Runner, kind: Kind) -> None:
    error = MockError("mock error")
    seen: list[BaseException] = []

    class FailingBus:
        def publish(self, *events: declsaga.Event) -> None:
            raise error

    def foo(ctx: declsaga.Context) -> None:
        try:
            ctx.publish(declsaga.Event("foo"))
        except MockError as caught:
            seen.append(caught)

    async def afoo(ctx: declsaga.Context) -> None:
        try:
            await ctx.publish_async(declsaga.Event("foo"))
        except MockError as caught:
            seen.append(caught)

    run(Executor(event_bus=FailingBus()), declsaga.new({"foo": foo if kind == "sync" else afoo}))

    assert seen == [error]
    assert seen[0] is error


# -- TestExecute_commandBus / TestContext_Dispatch --


def test_dispatch_through_the_context_is_synchronous(run: Runner, kind: Kind) -> None:
    bus = declsaga.InMemoryCommandBus()
    command = declsaga.Command("foo", {"n": 1})
    order: list[object] = []

    def handler(received: declsaga.Command) -> str:
        order.append(received)
        return "handled"

    bus.handle("foo", handler)

    def foo(ctx: declsaga.Context) -> None:
        order.append(ctx.dispatch(command))

    async def afoo(ctx: declsaga.Context) -> None:
        order.append(await ctx.dispatch_async(command))

    run(Executor(command_bus=bus), declsaga.new({"foo": foo if kind == "sync" else afoo}))

    assert order == [command, "handled"]
    assert order[0] is command


def test_dispatch_error_and_missing_command_bus(run: Runner, kind: Kind) -> None:
    error = MockError("mock error")
    bus = declsaga.InMemoryCommandBus()

    def handler(received: declsaga.Command) -> None:
        raise error

    bus.handle("foo", handler)

    def foo(ctx: declsaga.Context) -> None:
        ctx.dispatch(declsaga.Command("foo"))

    async def afoo(ctx: declsaga.Context) -> None:
        await ctx.dispatch_async(declsaga.Command("foo"))

    setup = declsaga.new({"foo": foo if kind == "sync" else afoo})

    with pytest.raises(MockError) as caught:
        run(Executor(command_bus=bus), setup)
    assert caught.value is error

    with pytest.raises(
        MissingBus,
        match=whole(
            "Action 'foo' used the command bus, but the executor has none: "
            "pass command_bus= to Executor."
        ),
    ):
        run(Executor(), setup)


# -- TestExecute_repository / TestContext_Fetch --


class Order:
    def __init__(self, id: str, total: int = 0) -> None:
        self.id = id
        self.total = total


def test_fetch_through_the_context(run: Runner, kind: Kind) -> None:
    repository = declsaga.InMemoryRepository()
    repository.save(Order("o-1", total=30))
    fetched: list[int] = []

    def foo(ctx: declsaga.Context) -> None:
        fetched.append(ctx.fetch(Order("o-1")).total)

    async def afoo(ctx: declsaga.Context) -> None:
        fetched.append((await ctx.fetch_async(Order("o-1"))).total)

    run(Executor(repository=repository), declsaga.new({"foo": foo if kind == "sync" else afoo}))

    assert fetched == [30]


def test_fetch_error_and_missing_repository(run: Runner, kind: Kind) -> None:
    def foo(ctx: declsaga.Context) -> None:
        ctx.fetch(Order("o-2"))

    async def afoo(ctx: declsaga.Context) -> None:
        await ctx.fetch_async(Order("o-2"))

    setup = declsaga.new({"foo": foo if kind == "sync" else afoo})

    with pytest.raises(
        declsaga.AggregateNotFound, match=whole("No Order aggregate with id 'o-2' is stored.")
    ):
        run(Executor(repository=declsaga.InMemoryRepository()), setup)

    with pytest.raises(
        MissingRepository,
        match=whole(
            "Action 'foo' fetched an aggregate, but the executor has no repository: "
            "pass repository= to Executor."
        ),
    ):
        run(Executor(), setup)


# -- action_test.go: TestAction_Name, TestAction_Run, TestAction_Run_error --


def test_action_name_and_run() -> None:
    ctx = cast(declsaga.Context, object())
    seen: list[object] = []

    def fn(received: declsaga.Context) -> str:
        seen.append(received)
        return "result"

    action = declsaga.Action("foo", fn)

    assert action.name == "foo"
    assert action.fn is fn
    assert action.run(ctx) == "result"
    assert seen == [ctx]


def test_async_action_run_returns_the_coroutine_to_await() -> None:
    ctx = cast(declsaga.Context, object())

    async def fn(received: declsaga.Context) -> object:
        return received

    assert asyncio.run(cast(Any, declsaga.Action("foo", fn).run(ctx))) is ctx


def test_action_run_error() -> None:
    error = MockError("mock error")

    def fn(ctx: declsaga.Context) -> None:
        raise error

    with pytest.raises(MockError) as caught:
        declsaga.Action("foo", fn).run(cast(declsaga.Context, object()))
    assert caught.value is error


# -- context_test.go: TestContext_Current, TestContext_Run, TestContext_Run_customRunner --


def test_context_action_is_the_running_action(run: Runner, kind: Kind) -> None:
    seen: list[tuple[declsaga.Action, str]] = []

    def record(ctx: declsaga.Context) -> None:
        seen.append((ctx.action, ctx.saga_id))
        if ctx.action.name == "foo":
            ctx.run("bar")

    async def arecord(ctx: declsaga.Context) -> None:
        seen.append((ctx.action, ctx.saga_id))
        if ctx.action.name == "foo":
            await ctx.run_async("bar")

    fn = record if kind == "sync" else arecord
    setup = declsaga.new({"foo": fn, "bar": fn})

    run(Executor(), setup, "saga-1")

    assert seen == [(setup.action("foo"), "saga-1"), (setup.action("bar"), "saga-1")]


def test_context_run_returns_and_raises_what_the_action_did(run: Runner, kind: Kind) -> None:
    error = MockError("mock error")
    seen: list[object] = []

    def foo(ctx: declsaga.Context) -> None:
        seen.append(ctx.run("bar"))
        for name in ("baz", "nope"):
            try:
                ctx.run(name)
            except Exception as caught:
                seen.append(caught)

    async def afoo(ctx: declsaga.Context) -> None:
        seen.append(await ctx.run_async("bar"))
        for name in ("baz", "nope"):
            try:
                await ctx.run_async(name)
            except Exception as caught:
                seen.append(caught)

    rec = Recorder(kind)
    setup = declsaga.new(
        {
            "foo": foo if kind == "sync" else afoo,
            "bar": rec.action("bar", result={"bar": 1}),
            "baz": rec.action("baz", error=error),
        }
    )

    report = run(Executor(), setup)

    result, baz_error, unknown = seen
    assert result == {"bar": 1}
    assert baz_error is error
    assert isinstance(unknown, ActionNotFound)
    assert str(unknown) == "No action named 'nope' (run by 'foo')."
    assert rec.chain == ["bar", "baz"]
    assert names(report.runs) == ["bar", "baz", "foo"]  # an unknown name has no run
    assert report.runs[1].error is error


# -- goes: "New returns a reusable Setup that can be safely executed concurrently" --


def test_one_setup_and_executor_run_concurrently(kind: Kind) -> None:
    chains: dict[str, list[str]] = {}
    lock = threading.Lock()

    def note(ctx: declsaga.Context) -> None:
        with lock:
            chains.setdefault(ctx.saga_id, []).append(ctx.action.name)

    def foo(ctx: declsaga.Context) -> None:
        ctx.run("bar")
        time.sleep(0.01)
        note(ctx)

    def bar(ctx: declsaga.Context) -> None:
        time.sleep(0.01)
        note(ctx)

    async def afoo(ctx: declsaga.Context) -> None:
        await ctx.run_async("bar")
        await asyncio.sleep(0.01)
        note(ctx)

    async def abar(ctx: declsaga.Context) -> None:
        await asyncio.sleep(0.01)
        note(ctx)

    setup = declsaga.new({"foo": foo, "bar": bar} if kind == "sync" else {"foo": afoo, "bar": abar})
    executor = Executor()
    ids = [f"s-{i}" for i in range(8)]

    async def main() -> list[Report]:
        return list(await asyncio.gather(*(executor.execute_async(setup, saga_id=i) for i in ids)))

    reports = asyncio.run(main())

    assert chains == {i: ["bar", "foo"] for i in ids}
    assert [names(report.runs) for report in reports] == [["bar", "foo"]] * len(ids)
