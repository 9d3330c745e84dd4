"""Property test of the rollback rules (SPEC section 4) against a small reference model.

Hypothesis draws a setup (a sequence over a few top-level actions, acyclic `ctx.run` call
trees over nested actions, compensators that may fail and may run nested actions
themselves), ONE failing run (any run of the forward phase, counted in start order, or
none), and whether each action is sync or async. `reference()` states the rules in a few
lines; the executor's observed event log, its `Report` and what it raised must match.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import event, given, settings
from hypothesis import strategies as st

import declsaga
from declsaga import CompensationFailed, Executor, Report

TOP = ("t0", "t1", "t2")
NESTED = ("n0", "n1", "n2", "n3")
ACTIONS = TOP + NESTED


def comp_name(name: str) -> str:
    return f"c-{name}"


class Boom(Exception):
    """What the one failing run raises."""


class CompBoom(Exception):
    """What a failing compensator raises."""


@dataclass(frozen=True)
class Plan:
    sequence: tuple[str, ...]
    calls: dict[str, tuple[str, ...]]  # what each action runs through ctx.run, in order
    catches: dict[str, bool]  # does the caller swallow a nested failure (else re-raise)?
    compensated: frozenset[str]  # actions that have the compensator comp_name(action)
    failing_comps: frozenset[str]  # compensators that raise
    comp_calls: dict[str, tuple[str, ...]]  # what each compensator runs before it ends
    is_async: dict[str, bool]  # by action name, compensators included
    fail_at: int | None  # the forward run (in start order) that raises Boom
    mode: Literal["execute", "execute_async"]


def tree_size(calls: dict[str, tuple[str, ...]], name: str) -> int:
    return 1 + sum(tree_size(calls, callee) for callee in calls[name])


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    sequence = tuple(draw(st.lists(st.sampled_from(TOP), min_size=1, max_size=6)))
    calls: dict[str, tuple[str, ...]] = {}
    for name in TOP:
        calls[name] = tuple(draw(st.lists(st.sampled_from(NESTED), max_size=2)))
    for index, name in enumerate(NESTED):
        # A nested action only calls later ones: the call graph is acyclic, depth <= 4.
        later = NESTED[index + 1 :]
        calls[name] = tuple(draw(st.lists(st.sampled_from(later), max_size=2))) if later else ()
    # Weighted draws (Hypothesis favours 0, hence the odd comparisons): a swallowed
    # failure, a missing compensator or a failure at the very start make dull examples.
    catches = {name: draw(st.integers(0, 2)) == 2 for name in ACTIONS}
    compensated = frozenset(name for name in ACTIONS if draw(st.integers(0, 3)) < 3)
    comps = [comp_name(name) for name in ACTIONS if name in compensated]
    failing_comps = frozenset(comp for comp in comps if draw(st.integers(0, 3)) == 3)
    comp_calls = {
        comp: tuple(draw(st.lists(st.sampled_from(NESTED), max_size=1))) for comp in comps
    }
    is_async = {name: draw(st.booleans()) for name in (*ACTIONS, *comps)}
    planned = sum(tree_size(calls, name) for name in sequence)
    fail_at: int | None = None
    if draw(st.integers(0, 5)) < 5:
        fail_at = draw(st.integers(0, planned - 1))
        if draw(st.booleans()):
            fail_at = planned - 1 - fail_at
    mode: Literal["execute", "execute_async"] = draw(st.sampled_from(["execute", "execute_async"]))
    return Plan(
        sequence, calls, catches, compensated, failing_comps, comp_calls, is_async, fail_at, mode
    )


# -- the reference model ---------------------------------------------------------------------


@dataclass
class ModelRun:
    name: str
    error: BaseException | None
    compensated_by: int | None = None  # index of the compensating run


@dataclass
class Outcome:
    runs: list[ModelRun] = field(default_factory=list)
    raised: BaseException | None = None  # the action's error, or None on success
    rollback_error: BaseException | None = None  # set: CompensationFailed is raised


def reference(plan: Plan, boom: Boom, comp_errors: dict[str, CompBoom]) -> Outcome:
    """goes' rules, fixed as SPEC section 4 says, stated as directly as possible."""
    outcome = Outcome()
    runs = outcome.runs
    started = 0

    def run(name: str) -> BaseException | None:
        nonlocal started
        position = started
        started += 1
        error = None
        for callee in plan.calls[name]:
            nested_error = run(callee)
            if nested_error is not None and not plan.catches[name]:
                error = nested_error
                break
        if error is None and position == plan.fail_at:
            error = boom
        runs.append(ModelRun(name, error))  # recorded when it finishes
        return error

    for name in plan.sequence:
        outcome.raised = run(name)
        if outcome.raised is not None:
            break  # a failing top-level action stops the sequence
    if outcome.raised is None:
        return outcome

    for index in reversed(range(len(runs))):  # only the runs recorded before the rollback
        target = runs[index]
        if target.error is not None or target.name not in plan.compensated:
            continue
        comp = comp_name(target.name)
        for callee in plan.comp_calls[comp]:
            run(callee)
        runs.append(ModelRun(comp, comp_errors.get(comp)))
        if comp in comp_errors:
            outcome.rollback_error = comp_errors[comp]
            return outcome  # the first failing compensator stops the rollback
        target.compensated_by = len(runs) - 1
    return outcome


# -- the saga under test -------------------------------------------------------------------------

Log = list[tuple[str, BaseException | None]]


def build_setup(
    plan: Plan, boom: Boom, comp_errors: dict[str, CompBoom], log: Log
) -> declsaga.Setup:
    started = 0

    def next_position() -> int:
        nonlocal started
        started += 1
        return started - 1

    def forward(name: str) -> Callable[[declsaga.Context], object]:
        calls, catches = plan.calls[name], plan.catches[name]
        if not plan.is_async[name]:

            def sync_action(ctx: declsaga.Context) -> None:
                position = next_position()
                try:
                    for callee in calls:
                        try:
                            ctx.run(callee)
                        except Boom:
                            if not catches:
                                raise
                    if position == plan.fail_at:
                        raise boom
                except BaseException as error:
                    log.append((name, error))
                    raise
                log.append((name, None))

            return sync_action

        async def async_action(ctx: declsaga.Context) -> None:
            position = next_position()
            try:
                for callee in calls:
                    try:
                        await ctx.run_async(callee)
                    except Boom:
                        if not catches:
                            raise
                if position == plan.fail_at:
                    raise boom
            except BaseException as error:
                log.append((name, error))
                raise
            log.append((name, None))

        return async_action

    def compensator(comp: str) -> Callable[[declsaga.Context], object]:
        calls, error = plan.comp_calls[comp], comp_errors.get(comp)
        if not plan.is_async[comp]:

            def sync_comp(ctx: declsaga.Context) -> None:
                for callee in calls:
                    ctx.run(callee)
                log.append((comp, error))
                if error is not None:
                    raise error

            return sync_comp

        async def async_comp(ctx: declsaga.Context) -> None:
            for callee in calls:
                await ctx.run_async(callee)
            log.append((comp, error))
            if error is not None:
                raise error

        return async_comp

    actions = {name: forward(name) for name in ACTIONS}
    actions.update({comp_name(name): compensator(comp_name(name)) for name in plan.compensated})
    return declsaga.new(
        actions,
        sequence=plan.sequence,
        compensators={name: comp_name(name) for name in plan.compensated},
    )


@settings(max_examples=200, deadline=None, database=None)
@given(plan=plans())
def test_rollback_follows_the_reference_model(plan: Plan) -> None:
    boom = Boom("boom")
    comp_errors = {comp: CompBoom(comp) for comp in plan.failing_comps}
    log: Log = []
    reports: list[Report] = []
    setup = build_setup(plan, boom, comp_errors, log)
    executor = Executor(reporter=reports.append)

    raised: BaseException | None = None
    returned: Report | None = None
    try:
        if plan.mode == "execute":
            returned = executor.execute(setup)
        else:
            returned = asyncio.run(executor.execute_async(setup))
    except Exception as error:
        raised = error

    expected = reference(plan, boom, comp_errors)
    event(
        "success"
        if expected.raised is None
        else "rolled back"
        if expected.rollback_error is None
        else "rollback failed"
    )
    event(f"compensations: {sum(run.compensated_by is not None for run in expected.runs)}")

    # The reporter is called once, with the outcome; on success `execute` returns the report.
    assert len(reports) == 1
    assert reports[0].error is raised
    report = reports[0] if returned is None else returned

    # The observed log and the report's runs: names and error objects, completion order.
    expected_runs = [(run.name, run.error) for run in expected.runs]
    assert log == expected_runs
    assert [(run.action, run.error) for run in report.runs] == expected_runs
    assert [(run.action, run.error) for run in reports[0].runs] == expected_runs
    assert all(
        got.error is want.error for got, want in zip(report.runs, expected.runs, strict=True)
    )

    # Which run undid which, and the groupings (as positions in `runs`).
    runs = list(report.runs)
    assert [
        None if run.compensated_by is None else runs.index(run.compensated_by) for run in runs
    ] == [run.compensated_by for run in expected.runs]
    assert [runs.index(run) for run in report.succeeded] == [
        i for i, run in enumerate(expected.runs) if run.error is None
    ]
    assert [runs.index(run) for run in report.failed] == [
        i for i, run in enumerate(expected.runs) if run.error is not None
    ]
    assert [runs.index(run) for run in report.compensated] == [
        i for i, run in enumerate(expected.runs) if run.compensated_by is not None
    ]

    # The outcome.
    if expected.raised is None:
        assert raised is None
        assert returned is not None
    elif expected.rollback_error is None:
        assert raised is expected.raised
    else:
        assert isinstance(raised, CompensationFailed)
        assert raised.action_error is expected.raised
        assert raised.error is expected.rollback_error
        assert raised.__cause__ is expected.rollback_error
