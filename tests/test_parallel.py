"""Parallel step groups: definitions, the engine's rules, both drivers, and recovery.

The members of a group are made to complete in a chosen order: each waits until the
member before it in that order has its outcome recorded (a peek at the execution's
journal through `ctx`), so that completion orders, and the compensation orders that
follow from them, are exact.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import pytest
from conftest import method_of
from delegates import CRASH, Counting, Crashing

import declsaga
from declsaga import (
    ActionRun,
    Context,
    DefinitionError,
    Executor,
    InvalidSetup,
    Report,
    Saga,
    Setup,
    StoreError,
    UsageError,
    compensates,
    step,
)
from declsaga._engine import (
    Compensate,
    Engine,
    Finish,
    GroupEngine,
    RunGroup,
    RunStep,
    StartRollback,
    engine_for,
)
from declsaga._journal import (
    Role,
    RollbackStarted,
    RunFailed,
    RunStarted,
    RunSucceeded,
    SagaStarted,
    Status,
)
from declsaga.inspection import plan
from declsaga.policies import DeadlineExceeded, Retry, StepTimeout
from declsaga.stores import Commit, Store
from declsaga.testing import FakeClock

if TYPE_CHECKING:
    from conftest import Run

pytestmark = pytest.mark.usefixtures("no_async_leaks")

ActionFn = Callable[[Context], Any]

LOG: list[str] = []
WAIT = 10.0  # seconds a member waits for another before the test fails


@pytest.fixture(autouse=True)
def _fresh_log() -> Iterator[None]:
    LOG.clear()
    yield
    LOG.clear()


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


class Failed(Exception):
    """What a failing member raises: its name."""


def names(runs: Sequence[ActionRun]) -> list[str]:
    return [run.action for run in runs]


def outcomes(runs: Sequence[ActionRun]) -> list[str]:
    """Each run as `action`, `action failed: Type` or `action <- compensator`."""
    shown = []
    for run in runs:
        if run.error is not None:
            shown.append(f"{run.action} failed: {type(run.error).__name__}")
        elif run.compensated_by is not None:
            shown.append(f"{run.action} <- {run.compensated_by.action}")
        else:
            shown.append(run.action)
    return shown


# -- members that finish in a chosen order ------------------------------------------------


def recorded(ctx: Context) -> list[str]:
    """The actions whose runs have an outcome in the execution that `ctx` belongs to
    (replayed ones included) and, in a durable execution, no longer waiting to be
    committed: committed, or lost to a failed commit. A peek at the execution's journal
    and at its durable log's queue."""
    execution = ctx._execution
    log = execution.log
    while True:
        records = list(execution.records)
        if log is None or log.broken is not None:  # no store, or nothing more to commit
            waiting: set[object] = set()
            break
        if log._commit_lock.locked():  # a commit under way: ask again once it ends
            return []
        waiting = {entry.get("run") for entry in list(log._pending)}
        if not log._commit_lock.locked():  # none started meanwhile: what it took is done
            break
    started = {r.run: r.action for r in records if type(r) is RunStarted}
    return [
        started[r.run]
        for r in records
        if (type(r) is RunSucceeded or type(r) is RunFailed) and r.run not in waiting
    ]


def wait_blocking(ctx: Context, name: str) -> None:
    deadline = time.monotonic() + WAIT
    while name not in recorded(ctx):
        assert time.monotonic() < deadline, f"{name} never finished"
        time.sleep(0.001)


async def wait_async(ctx: Context, name: str) -> None:
    deadline = time.monotonic() + WAIT
    while name not in recorded(ctx):
        assert time.monotonic() < deadline, f"{name} never finished"
        await asyncio.sleep(0.001)


def member(
    name: str, *, after: str | None = None, fails: bool = False, kind: str = "sync"
) -> ActionFn:
    """A step that waits until `after` has its outcome recorded (see `recorded`), then logs
    `name key` and returns its idempotency key, or raises `Failed(name)`. An async one
    cancelled meanwhile logs `name cancelled`."""

    def sync_member(ctx: Context) -> str:
        if after is not None:
            wait_blocking(ctx, after)
        LOG.append(f"{name} {ctx.idempotency_key}")
        if fails:
            raise Failed(name)
        return ctx.idempotency_key

    async def async_member(ctx: Context) -> str:
        try:
            if after is not None:
                await wait_async(ctx, after)
        except asyncio.CancelledError:
            LOG.append(f"{name} cancelled")
            raise
        LOG.append(f"{name} {ctx.idempotency_key}")
        if fails:
            raise Failed(name)
        return ctx.idempotency_key

    return async_member if kind == "async" else sync_member


def logged(name: str) -> ActionFn:
    def action(ctx: Context) -> str:
        LOG.append(f"{name} {ctx.idempotency_key}")
        return ctx.idempotency_key

    return action


def undo(name: str) -> ActionFn:
    def compensator(ctx: Context) -> None:
        LOG.append(f"undo {name}")

    return compensator


GROUP = ("b", "c", "d")
COMPLETION = ("d", "b", "c")  # the order in which the group's members finish


def group_actions(
    *, kind: str = "sync", fails: Sequence[str] = (), completion: Sequence[str] = COMPLETION
) -> dict[str, ActionFn]:
    """a, then the group b, c, d (finishing in `completion` order), then e; each undone
    by undo-<name>."""
    actions: dict[str, ActionFn] = {"a": logged("a")}
    for position, name in enumerate(completion):
        after = completion[position - 1] if position else None
        actions[name] = member(name, after=after, fails=name in fails, kind=kind)
    actions["e"] = logged("e")
    actions.update({f"undo-{name}": undo(name) for name in "abcde"})
    return actions


COMPENSATORS = {name: f"undo-{name}" for name in "abcde"}


def grouped(
    api: str,
    actions: Mapping[str, ActionFn],
    *,
    name: str | None = None,
    compensators: Mapping[str, str] = COMPENSATORS,
) -> Setup:
    """The setup a, (b, c, d), e built with new() or as a Saga class."""
    if api == "new":
        return declsaga.new(
            actions,
            sequence=["a", "b", "c", "d", "e"],
            compensators=compensators,
            parallel=[GROUP],
            name=name,
        )
    orders = {"a": 1, "b": 2, "c": 2, "d": 2, "e": 3}
    undoes = {compensator: target for target, compensator in compensators.items()}
    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": "Grouped"}
    for action_name, fn in actions.items():
        method = method_of(fn)
        if action_name in orders:
            parallel = action_name in GROUP
            marked = step(order=orders[action_name], name=action_name, parallel=parallel)(method)
        else:
            marked = compensates(undoes[action_name], name=action_name)(method)
        namespace[f"method_{action_name.replace('-', '_')}"] = marked
    options = {} if name is None else {"name": name}
    cls: type[Saga] = type("Grouped", (Saga,), namespace, **options)
    return cls()


@pytest.fixture(params=["new", "dsl"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def execute(mode: str, executor: Executor, setup: Setup, saga_id: str | None = None) -> Report:
    if mode == "execute":
        return executor.execute(setup, saga_id=saga_id)
    return asyncio.run(executor.execute_async(setup, saga_id=saga_id))


def report_of(mode: str, setup: Setup, saga_id: str = "s") -> tuple[Report, BaseException | None]:
    """Execute; return the report (from the reporter) and what the execution raised."""
    reports: list[Report] = []
    raised: BaseException | None = None
    try:
        execute(mode, Executor(reporter=reports.append), setup, saga_id)
    except Exception as error:
        raised = error
    [report] = reports
    assert report.error is raised
    return report, raised


# -- the DSL --------------------------------------------------------------------------------


class Checkout(Saga):
    charged: str | None = None
    reserved: str | None = None

    @step(order=1)
    def start(self, ctx: Context) -> None: ...

    @step(order=2, parallel=True)
    def reserve(self, ctx: Context) -> None:
        self.reserved = ctx.idempotency_key

    @step(order=2, parallel=True)
    async def charge(self, ctx: Context) -> None:
        self.charged = ctx.idempotency_key

    @compensates("charge")
    def refund(self, ctx: Context) -> None: ...

    @step(order=3)
    def ship(self, ctx: Context) -> None: ...


def test_the_steps_of_one_order_marked_parallel_form_a_group_sorted_by_name() -> None:
    saga = Checkout()
    assert saga.sequence() == ("start", "charge", "reserve", "ship")
    assert saga._declsaga_groups() == (("charge", "reserve"),)
    compiled = plan(Checkout)
    assert compiled.groups == (("charge", "reserve"),)
    assert [(info.name, info.order, info.parallel) for info in compiled.steps] == [
        ("start", 1, False),
        ("charge", 2, True),
        ("reserve", 2, True),
        ("ship", 3, False),
    ]
    report = declsaga.execute(saga, saga_id="o-1")
    assert sorted(names(report.runs)[1:3]) == ["charge", "reserve"]
    assert (saga.charged, saga.reserved) == ("o-1/1", "o-1/2")  # one run, one key each


def test_a_saga_without_groups_has_none() -> None:
    class Plain(Saga):
        @step(order=1)
        def one(self, ctx: Context) -> None: ...

    assert Plain()._declsaga_groups() == ()
    assert plan(Plain).groups == ()
    assert type(engine_for(Plain())) is Engine


@pytest.mark.parametrize("plain_first", [True, False])
def test_a_parallel_step_sharing_its_order_with_a_plain_one_is_a_definition_error(
    plain_first: bool,
) -> None:
    def plain(self: Saga, ctx: Context) -> None: ...

    def grouped(self: Saga, ctx: Context) -> None: ...

    plain.__qualname__ = "Mixed.audit"
    grouped.__qualname__ = "Mixed.charge"
    methods = {
        "audit": step(order=2)(plain),
        "charge": step(order=2, parallel=True)(grouped),
    }
    ordered = dict(sorted(methods.items(), reverse=not plain_first))
    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga Mixed: step charge has parallel=True and order 2, which step audit has "
            "without parallel=True; the steps of a parallel group all say parallel=True: "
            "add it to audit, or give one of them another order."
        ),
    ):
        type("Mixed", (Saga,), {"__module__": __name__, "__qualname__": "Mixed", **ordered})


def test_a_plain_step_joining_an_inherited_group_is_a_definition_error() -> None:
    class Base(Saga):
        @step(order=1, parallel=True)
        def left(self, ctx: Context) -> None: ...

        @step(order=1, parallel=True)
        def right(self, ctx: Context) -> None: ...

    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga test_a_plain_step_joining_an_inherited_group_is_a_definition_error.<locals>"
            ".Child: step left (inherited from test_a_plain_step_joining_an_inherited_group_"
            "is_a_definition_error.<locals>.Base) has parallel=True and order 1, which step "
            "middle has without parallel=True; the steps of a parallel group all say "
            "parallel=True: add it to middle, or give one of them another order."
        ),
    ):

        class Child(Base):
            @step(order=1)
            def middle(self, ctx: Context) -> None: ...


def test_a_subclass_may_add_a_member_to_an_inherited_group() -> None:
    class Base(Saga):
        @step(order=1, parallel=True)
        def left(self, ctx: Context) -> None: ...

        @step(order=1, parallel=True)
        def right(self, ctx: Context) -> None: ...

        @step(order=2)
        def after(self, ctx: Context) -> None: ...

    class Child(Base):
        @step(order=1, parallel=True)
        def middle(self, ctx: Context) -> None: ...

    assert Child().sequence() == ("left", "middle", "right", "after")
    assert Child()._declsaga_groups() == (("left", "middle", "right"),)
    assert Base()._declsaga_groups() == (("left", "right"),)


def test_a_lone_parallel_step_is_a_definition_error() -> None:
    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga test_a_lone_parallel_step_is_a_definition_error.<locals>.Lonely: step "
            "charge has parallel=True, but no other step has order 2; a parallel group is "
            "two or more steps of one order: add another, or drop parallel=True."
        ),
    ):

        class Lonely(Saga):
            @step(order=1)
            def start(self, ctx: Context) -> None: ...

            @step(order=2, parallel=True)
            def charge(self, ctx: Context) -> None: ...


def test_removing_a_member_in_a_subclass_can_leave_a_lone_parallel_step() -> None:
    class Pair(Saga):
        @step(order=1, parallel=True)
        def left(self, ctx: Context) -> None: ...

        @step(order=1, parallel=True)
        def right(self, ctx: Context) -> None: ...

    with pytest.raises(DefinitionError, match=r"step left .* has parallel=True, but no other"):

        class Half(Pair):
            def right(self, ctx: Context) -> None: ...  # an undecorated override removes it


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_parallel_must_be_true_or_false(value: object) -> None:
    def charge(self: Saga, ctx: Context) -> None: ...

    charge.__qualname__ = "Shop.charge"
    with pytest.raises(
        DefinitionError,
        match=exactly(
            f"Saga Shop: the parallel= of step charge must be True or False, got {value!r} "
            f"({type(value).__name__})."
        ),
    ):
        step(order=1, parallel=value)(charge)  # type: ignore[call-overload]


def test_two_plain_steps_of_one_order_keep_their_error() -> None:
    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga test_two_plain_steps_of_one_order_keep_their_error.<locals>.Twice: steps "
            "one and two both have order 1; give each step its own order."
        ),
    ):

        class Twice(Saga):
            @step(order=1)
            def one(self, ctx: Context) -> None: ...

            @step(order=1)
            def two(self, ctx: Context) -> None: ...


def test_a_decorated_twice_message_spells_parallel() -> None:
    with pytest.raises(
        DefinitionError,
        match=exactly(
            "Saga Shop: method charge is decorated twice, with @step(order=1) and "
            "@step(order=2, parallel=True); a method is one step, compensator or action."
        ),
    ):

        def charge(self: Saga, ctx: Context) -> None: ...

        charge.__qualname__ = "Shop.charge"
        step(order=1)(step(order=2, parallel=True)(charge))


def test_groups_are_in_the_fingerprint_only_when_there_are_some() -> None:
    actions = dict.fromkeys("abc", logged("x"))
    plain = declsaga.new(actions, sequence=["a", "b", "c"])
    pair = declsaga.new(actions, sequence=["a", "b", "c"], parallel=[("b", "c")])
    other = declsaga.new(actions, sequence=["a", "b", "c"], parallel=[("a", "b")])
    shapes = [setup.definition.as_json() for setup in (plain, pair, other)]  # type: ignore[attr-defined]
    assert "groups" not in shapes[0]
    assert (shapes[1]["groups"], shapes[2]["groups"]) == ([["b", "c"]], [["a", "b"]])
    prints = {setup.definition.fingerprint for setup in (plain, pair, other)}  # type: ignore[attr-defined]
    assert len(prints) == 3
    assert pair.definition.differences(plain.definition.as_json()) == (  # type: ignore[attr-defined]
        "parallel groups [] became [['b', 'c']]"
    )


# -- new() ----------------------------------------------------------------------------------

SEQUENCE = ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("parallel", "sequence", "message"),
    [
        (
            "ab",
            SEQUENCE,
            "parallel must be a list of groups of action names, e.g. "
            "parallel=[('charge', 'reserve')], got 'ab' (str).",
        ),
        (
            3,
            SEQUENCE,
            "parallel must be a list of groups of action names, e.g. "
            "parallel=[('charge', 'reserve')], got 3 (int).",
        ),
        (
            ["ab"],
            SEQUENCE,
            "new() got the parallel group 'ab'; a group is a tuple of two or more action "
            "names of the sequence, e.g. ('charge', 'reserve').",
        ),
        (
            [("a",)],
            SEQUENCE,
            "new() got the parallel group ('a',); a group runs two or more actions of the "
            "sequence together.",
        ),
        (
            [()],
            SEQUENCE,
            "new() got the parallel group (); a group runs two or more actions "
            "of the sequence together.",
        ),
        ([("a", 1)], SEQUENCE, "A name in a parallel group must be a string, got 1 (int)."),
        ([("a", "a")], SEQUENCE, "new() got the parallel group ('a', 'a'), which names 'a' twice."),
        (
            [("a", "x")],
            SEQUENCE,
            "new() got the parallel group ('a', 'x'), but 'x' is not in the sequence "
            "['a', 'b', 'c', 'd'].",
        ),
        (
            [("a", "b")],
            ["a", "b", "a"],
            "new() got the parallel group ('a', 'b'), but 'a' appears more than once in the "
            "sequence ['a', 'b', 'a'], so its place is ambiguous.",
        ),
        (
            [("a", "b"), ("c", "b")],
            SEQUENCE,
            "new() got 'b' in two parallel groups, ('a', 'b') and ('c', 'b'); an action "
            "belongs to one group at most.",
        ),
        (
            [("a", "c")],
            SEQUENCE,
            "new() got the parallel group ('a', 'c'), whose names are not consecutive in the "
            "sequence ['a', 'b', 'c', 'd']; a group takes consecutive places of the sequence.",
        ),
        (
            [("a", "b")],
            None,  # the default sequence is the first action alone
            "new() got the parallel group ('a', 'b'), but 'b' is not in the sequence ['a'].",
        ),
    ],
)
def test_new_refuses_bad_groups(parallel: Any, sequence: list[str] | None, message: str) -> None:
    with pytest.raises(UsageError, match=exactly(message)):
        declsaga.new(dict.fromkeys("abcd", logged("x")), sequence=sequence, parallel=parallel)


def test_new_keeps_groups_in_sequence_order() -> None:
    setup = declsaga.new(
        dict.fromkeys("abcdef", logged("x")),
        sequence=list("abcdef"),
        parallel=[["f", "e"], ("c", "b", "d")],
    )
    assert setup._declsaga_groups() == (("b", "c", "d"), ("e", "f"))  # type: ignore[attr-defined]
    assert repr(setup) == (
        "<setup sequence=['a', 'b', 'c', 'd', 'e', 'f'] actions=['a', 'b', 'c', 'd', 'e', 'f'] "
        "compensators={} parallel=[['b', 'c', 'd'], ['e', 'f']]>"
    )
    assert type(engine_for(setup)) is GroupEngine
    without = declsaga.new(dict.fromkeys("ab", logged("x")), sequence=["a", "b"], parallel=[])
    assert type(engine_for(without)) is Engine


class HandWritten:
    """A setup written by hand, with groups through `_declsaga_groups()`."""

    def __init__(self, groups: tuple[tuple[str, ...], ...]) -> None:
        self.groups = groups
        self.actions = {name: declsaga.Action(name, logged(name)) for name in "abc"}

    def sequence(self) -> list[str]:
        return ["a", "b", "c"]

    def compensator(self, name: str) -> str | None:
        return None

    def action(self, name: str) -> declsaga.Action | None:
        return self.actions.get(name)

    def _declsaga_groups(self) -> tuple[tuple[str, ...], ...]:
        return self.groups


@pytest.mark.parametrize("groups", [(("a", "c"),), (("a",),), (("a", "b"), ("b", "c"))])
def test_validate_refuses_a_hand_written_setup_with_bad_groups(
    groups: tuple[tuple[str, ...], ...],
) -> None:
    bad = list(groups[-1])
    with pytest.raises(
        InvalidSetup,
        match=exactly(
            f"The parallel group {bad!r} is not two or more consecutive names of the "
            "sequence ['a', 'b', 'c'] outside the other groups."
        ),
    ):
        declsaga.validate(HandWritten(groups))


def test_a_hand_written_setup_with_groups_runs_them_together() -> None:
    report = declsaga.execute(HandWritten((("b", "c"),)), saga_id="h")
    assert sorted(LOG) == ["a h/0", "b h/1", "c h/2"]
    assert names(report.runs)[0] == "a"


# -- the engine alone -------------------------------------------------------------------------


def started(run: int, action: str, role: Role = Role.STEP, **kw: int) -> RunStarted:
    return RunStarted(run, action, role, kw.get("parent"), kw.get("index"), kw.get("target"), 0.0)


def pure_setup() -> Setup:
    return declsaga.new(
        dict.fromkeys(["a", "b", "c", "d", "e", *COMPENSATORS.values()], logged("x")),
        sequence=["a", "b", "c", "d", "e"],
        compensators=COMPENSATORS,
        parallel=[GROUP],
    )


def member_names(decision: object) -> list[tuple[str, int | None]]:
    assert type(decision) is RunGroup
    return [(action.name, run) for action, run in decision.members]


def test_the_engine_starts_a_group_then_lists_only_members_without_outcome() -> None:
    engine = engine_for(pure_setup())
    engine.apply(SagaStarted("s", datetime.now(UTC), 0.0))
    engine.apply(started(0, "a"))
    engine.apply(RunSucceeded(0, None, 0.0))
    assert member_names(engine.next()) == [("b", None), ("c", None), ("d", None)]
    for run, name in enumerate(GROUP, 1):
        engine.apply(started(run, name))
    # All in flight (what recovery sees after a crash right after the group started).
    assert member_names(engine.next()) == [("b", 1), ("c", 2), ("d", 3)]
    engine.apply(RunSucceeded(3, None, 0.0))
    assert member_names(engine.next()) == [("b", 1), ("c", 2)]
    assert engine.next() == engine.next()  # asking twice changes nothing
    engine.apply(RunSucceeded(1, None, 0.0))
    engine.apply(RunSucceeded(2, None, 0.0))
    decision = engine.next()
    assert type(decision) is RunStep
    assert (decision.action.name, decision.run) == ("e", None)
    engine.apply(started(4, "e"))
    engine.apply(RunSucceeded(4, None, 0.0))
    assert engine.next() == Finish(Status.COMPLETED, None)


def test_the_engine_rolls_back_after_the_group_settles_with_its_first_failure() -> None:
    engine = engine_for(pure_setup())
    engine.apply(started(0, "a"))
    engine.apply(RunSucceeded(0, None, 0.0))
    for run, name in enumerate(GROUP, 1):
        engine.apply(started(run, name))
    first, second = Failed("c"), Failed("b")
    engine.apply(RunSucceeded(3, None, 0.0))  # d
    engine.apply(RunFailed(2, first, 0.0))  # c: the first failure
    # b is still in flight: it runs on, whatever the failure recorded before.
    assert member_names(engine.next()) == [("b", 1)]
    engine.apply(RunFailed(1, second, 0.0))
    decision = engine.next()
    assert decision == StartRollback(first)
    engine.apply(RollbackStarted(first))
    undone = []
    for run in range(5, 10):
        decision = engine.next()
        if type(decision) is not Compensate:
            break
        undone.append(decision.target_action)
        engine.apply(started(run, decision.action.name, Role.COMPENSATION, target=decision.target))
        engine.apply(RunSucceeded(run, None, 0.0))
    assert undone == ["d", "a"]  # newest completed first; failed members are not undone
    assert decision == Finish(Status.COMPENSATED, first)


def test_compensations_follow_completion_order_not_sequence_order() -> None:
    engine = engine_for(pure_setup())
    engine.apply(started(0, "a"))
    engine.apply(RunSucceeded(0, None, 0.0))
    for run, name in enumerate(GROUP, 1):
        engine.apply(started(run, name))
    for run in (2, 3, 1):  # c, d, b
        engine.apply(RunSucceeded(run, None, 0.0))
    engine.apply(started(4, "e"))
    error = Failed("e")
    engine.apply(RunFailed(4, error, 0.0))
    engine.apply(RollbackStarted(error))
    undone = []
    for run in range(5, 10):
        decision = engine.next()
        if type(decision) is not Compensate:
            break
        undone.append(decision.target_action)
        engine.apply(started(run, decision.action.name, Role.COMPENSATION, target=decision.target))
        engine.apply(RunSucceeded(run, None, 0.0))
    assert undone == ["b", "d", "c", "a"]


def test_a_group_member_that_no_longer_resolves_fails_the_group_before_it_starts() -> None:
    setup = declsaga.new(
        dict.fromkeys("ab", logged("x")), sequence=["a", "b", "gone"], parallel=[("b", "gone")]
    )
    engine = engine_for(setup)
    decision = engine.next()
    assert type(decision) is RunStep
    engine.apply(started(0, "a"))
    engine.apply(RunSucceeded(0, None, 0.0))
    decision = engine.next()
    assert type(decision) is StartRollback
    assert str(decision.error) == str(declsaga.ActionNotFound("gone", role="in the sequence"))
    with pytest.raises(declsaga.ActionNotFound):
        declsaga.validate(setup)
    reports: list[Report] = []
    with pytest.raises(declsaga.ActionNotFound):
        declsaga.execute(setup, skip_validation=True, reporter=reports.append)
    assert names(reports[0].runs) == ["a"]  # neither b nor gone started


# -- execution: each member failing in turn -------------------------------------------------


def blocking_runs(fails: str) -> list[str]:
    """execute: every member finishes; the succeeded ones are undone, newest first."""
    runs = ["a <- undo-a"]
    succeeded = [name for name in COMPLETION if name != fails]
    runs += [
        f"{name} failed: Failed" if name == fails else f"{name} <- undo-{name}"
        for name in COMPLETION
    ]
    runs += [f"undo-{name}" for name in reversed(succeeded)] + ["undo-a"]
    return runs


@pytest.mark.parametrize("fails", GROUP)
def test_execute_awaits_every_member_and_undoes_those_that_succeeded(
    fails: str, kind: str, api: str
) -> None:
    report, raised = report_of("execute", grouped(api, group_actions(kind=kind, fails=[fails])))
    assert type(raised) is Failed
    assert str(raised) == fails
    assert outcomes(report.runs) == blocking_runs(fails)
    done = [f"{name} s/{GROUP.index(name) + 1}" for name in COMPLETION]
    undone = [f"undo {name}" for name in reversed(COMPLETION) if name != fails]
    assert ["a s/0", *done, *undone, "undo a"] == LOG


@pytest.mark.parametrize("fails", GROUP)
def test_execute_async_awaits_sync_members_and_undoes_those_that_succeeded(
    fails: str, api: str
) -> None:
    setup = grouped(api, group_actions(kind="sync", fails=[fails]))
    report, raised = report_of("execute_async", setup)
    assert (type(raised), str(raised)) == (Failed, fails)
    assert outcomes(report.runs) == blocking_runs(fails)


@pytest.mark.parametrize(
    ("fails", "expected", "log"),
    [
        (  # the first to finish fails: the two others are cancelled
            "d",
            [
                "a <- undo-a",
                "d failed: Failed",
                "b failed: CancelledError",
                "c failed: CancelledError",
                "undo-a",
            ],
            ["a s/0", "d s/3", "b cancelled", "c cancelled", "undo a"],
        ),
        (
            "b",
            [
                "a <- undo-a",
                "d <- undo-d",
                "b failed: Failed",
                "c failed: CancelledError",
                "undo-d",
                "undo-a",
            ],
            ["a s/0", "d s/3", "b s/1", "c cancelled", "undo d", "undo a"],
        ),
        (  # the last to finish fails: nothing is left to cancel
            "c",
            [
                "a <- undo-a",
                "d <- undo-d",
                "b <- undo-b",
                "c failed: Failed",
                "undo-b",
                "undo-d",
                "undo-a",
            ],
            ["a s/0", "d s/3", "b s/1", "c s/2", "undo b", "undo d", "undo a"],
        ),
    ],
)
def test_execute_async_cancels_async_members_at_the_first_failure(
    fails: str, expected: list[str], log: list[str], api: str
) -> None:
    setup = grouped(api, group_actions(kind="async", fails=[fails]))
    report, raised = report_of("execute_async", setup)
    assert (type(raised), str(raised)) == (Failed, fails)
    assert outcomes(report.runs) == expected
    assert log == LOG
    cancelled = [
        run.error for run in report.failed if isinstance(run.error, asyncio.CancelledError)
    ]
    assert len(cancelled) == len(report.failed) - 1


def test_execute_async_cancels_async_members_but_awaits_sync_ones() -> None:
    release = threading.Event()
    started_sync = threading.Event()

    def slow_sync(ctx: Context) -> str:
        started_sync.set()
        assert release.wait(WAIT)
        LOG.append("sync done")
        return "sync"

    async def slow_async(ctx: Context) -> None:
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            LOG.append("async cancelled")
            raise

    async def failing(ctx: Context) -> None:
        while not started_sync.is_set():
            await asyncio.sleep(0.001)
        # Let the sync member finish only once the failure has cancelled the others.
        threading.Timer(0.05, release.set).start()
        raise Failed("failing")

    setup = declsaga.new(
        {
            "slow_sync": slow_sync,
            "slow_async": slow_async,
            "failing": failing,
            "undo-sync": undo("sync"),
            "undo-async": undo("async"),
        },
        sequence=["slow_sync", "slow_async", "failing"],
        parallel=[("slow_sync", "slow_async", "failing")],
        compensators={"slow_sync": "undo-sync", "slow_async": "undo-async"},
    )
    report, raised = report_of("execute_async", setup)
    assert type(raised) is Failed
    assert outcomes(report.runs) == [
        "failing failed: Failed",
        "slow_async failed: CancelledError",
        "slow_sync <- undo-sync",
        "undo-sync",
    ]
    assert LOG == ["async cancelled", "sync done", "undo sync"]


def test_execute_runs_sync_members_in_worker_threads_at_the_same_time() -> None:
    barrier = threading.Barrier(3, timeout=WAIT)
    threads: list[str] = []

    def meet(ctx: Context) -> None:
        threads.append(threading.current_thread().name)
        barrier.wait()  # all three must be running at once to pass

    setup = declsaga.new(
        dict.fromkeys("xyz", meet), sequence=["x", "y", "z"], parallel=[("x", "y", "z")]
    )
    declsaga.execute(setup)
    assert threads == ["declsaga-worker"] * 3


def test_execute_runs_async_members_concurrently_on_its_private_loop() -> None:
    both: list[asyncio.AbstractEventLoop] = []
    arrived = 0

    async def meet(ctx: Context) -> None:
        nonlocal arrived
        both.append(asyncio.get_running_loop())
        arrived += 1
        while arrived < 2:
            await asyncio.sleep(0.001)

    setup = declsaga.new({"x": meet, "y": meet}, sequence=["x", "y"], parallel=[("x", "y")])
    declsaga.execute(setup)
    assert len(both) == 2
    assert both[0] is both[1]


def test_the_first_failure_in_completion_order_is_the_error(kind: str) -> None:
    setup = grouped("new", group_actions(kind=kind, fails=["c", "b"]))
    report, raised = report_of("execute", setup)
    assert (type(raised), str(raised)) == (Failed, "b")  # b finished before c
    assert outcomes(report.runs) == [
        "a <- undo-a",
        "d <- undo-d",
        "b failed: Failed",
        "c failed: Failed",
        "undo-d",
        "undo-a",
    ]


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_a_group_that_succeeds_is_reported_in_completion_order(
    mode: str, kind: str, api: str
) -> None:
    report, raised = report_of(mode, grouped(api, group_actions(kind=kind)))
    assert raised is None
    assert names(report.runs) == ["a", "d", "b", "c", "e"]
    assert LOG == ["a s/0", "d s/3", "b s/1", "c s/2", "e s/4"]


def test_a_failure_after_the_group_undoes_its_members_newest_completed_first(
    run: Run, kind: str
) -> None:
    actions = group_actions(kind=kind, completion=("c", "d", "b"))

    def e_fails(ctx: Context) -> None:
        raise Failed("e")

    actions["e"] = e_fails
    report, raised = report_of(run.mode, grouped("new", actions))
    assert (type(raised), str(raised)) == (Failed, "e")
    assert outcomes(report.runs) == [
        "a <- undo-a",
        "c <- undo-c",
        "d <- undo-d",
        "b <- undo-b",
        "e failed: Failed",
        "undo-b",
        "undo-d",
        "undo-c",
        "undo-a",
    ]


@pytest.mark.parametrize("helper_kind", ["sync", "async"])
def test_members_get_their_own_context_and_nested_calls(
    run: Run, kind: str, helper_kind: str
) -> None:
    seen: dict[str, tuple[str, str, str]] = {}

    def make(name: str) -> ActionFn:
        def sync_fn(ctx: Context) -> None:
            seen[name] = (ctx.action.name, ctx.idempotency_key, ctx.run("helper"))

        async def async_fn(ctx: Context) -> None:
            seen[name] = (ctx.action.name, ctx.idempotency_key, await ctx.run_async("helper"))

        return async_fn if kind == "async" else sync_fn

    def helper(ctx: Context) -> str:
        return ctx.idempotency_key

    async def async_helper(ctx: Context) -> str:
        return ctx.idempotency_key

    setup = declsaga.new(
        {
            "x": make("x"),
            "y": make("y"),
            "helper": async_helper if helper_kind == "async" else helper,
        },
        sequence=["x", "y"],
        parallel=[("x", "y")],
    )
    report = run(Executor(), setup, saga_id="n")
    assert {seen["x"][2], seen["y"][2]} == {"n/2", "n/3"}  # nested runs, in either order
    assert (seen["x"][:2], seen["y"][:2]) == (("x", "n/0"), ("y", "n/1"))
    assert sorted(names(report.runs)) == ["helper", "helper", "x", "y"]
    # Each nested run is recorded before its parent.
    for parent in ("x", "y"):
        position = names(report.runs).index(parent)
        assert "helper" in names(report.runs)[:position]


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_a_member_raising_keyboard_interrupt_fails_the_group_like_any_error(
    mode: str, kind: str
) -> None:
    def interrupted(ctx: Context) -> None:
        wait_blocking(ctx, "quick")
        raise KeyboardInterrupt

    async def async_interrupted(ctx: Context) -> None:
        await wait_async(ctx, "quick")
        raise KeyboardInterrupt

    reports: list[Report] = []
    setup = declsaga.new(
        {
            "quick": logged("quick"),
            "interrupted": async_interrupted if kind == "async" else interrupted,
            "undo-quick": undo("quick"),
        },
        sequence=["quick", "interrupted"],
        parallel=[("quick", "interrupted")],
        compensators={"quick": "undo-quick"},
    )
    with pytest.raises(KeyboardInterrupt):
        execute(mode, Executor(reporter=reports.append), setup, "k")
    assert outcomes(reports[0].runs) == [
        "quick <- undo-quick",
        "interrupted failed: KeyboardInterrupt",
        "undo-quick",
    ]
    assert LOG == ["quick k/0", "undo quick"]


def test_cancelling_execute_async_during_a_group_rolls_back_what_succeeded() -> None:
    in_group = threading.Event()
    release = threading.Event()

    def sync_member(ctx: Context) -> None:
        in_group.set()
        assert release.wait(WAIT)
        LOG.append("sync done")

    async def async_member(ctx: Context) -> None:
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            LOG.append("async cancelled")
            raise

    reports: list[Report] = []
    setup = declsaga.new(
        {
            "a": logged("a"),
            "sync_member": sync_member,
            "async_member": async_member,
            "undo-a": undo("a"),
            "undo-sync": undo("sync"),
        },
        sequence=["a", "sync_member", "async_member"],
        parallel=[("sync_member", "async_member")],
        compensators={"a": "undo-a", "sync_member": "undo-sync"},
    )

    async def main() -> None:
        task = asyncio.create_task(
            Executor(reporter=reports.append).execute_async(setup, saga_id="x")
        )
        while not in_group.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [report] = reports
    assert isinstance(report.error, asyncio.CancelledError)
    assert outcomes(report.runs) == [
        "a <- undo-a",
        "async_member failed: CancelledError",
        "sync_member <- undo-sync",
        "undo-sync",
        "undo-a",
    ]
    assert LOG == ["a x/0", "async cancelled", "sync done", "undo sync", "undo a"]


# -- policies -----------------------------------------------------------------------------


def test_a_member_with_a_retry_policy_is_retried_without_resetting_the_others_fields(
    run: Run,
) -> None:
    class Retried(Saga):
        left: list[int] = attrs.field(factory=list)
        right: str | None = None

        @step(order=1, parallel=True, retry=Retry(attempts=3, backoff=1.0, jitter=0))
        async def flaky(self, ctx: Context) -> None:
            while self.right is None:  # the other member's work lands first
                await asyncio.sleep(0.001)
            self.left = [*self.left, ctx.attempt]
            if ctx.attempt < 3:
                raise ConnectionError("again")

        @step(order=1, parallel=True)
        def steady(self, ctx: Context) -> None:
            self.right = ctx.idempotency_key

    saga = Retried()
    clock = FakeClock()
    report = run(Executor(clock=clock), saga, saga_id="r")
    assert clock.sleeps == [1.0, 2.0]
    assert saga.right == "r/1"  # kept: a retry in a group does not put fields back
    assert saga.left == [1, 2, 3]
    assert outcomes(report.runs) == ["steady", "flaky"]


def test_a_member_past_its_timeout_fails_the_group(run: Run) -> None:
    async def slow(ctx: Context) -> None:
        await asyncio.sleep(WAIT)

    setup = declsaga.new(
        {"slow": slow, "quick": logged("quick"), "undo-quick": undo("quick")},
        sequence=["quick", "slow"],
        parallel=[("quick", "slow")],
        compensators={"quick": "undo-quick"},
        timeouts={"slow": 0.05},
    )
    with pytest.raises(StepTimeout):
        run(Executor(), setup, saga_id="t")
    assert LOG == ["quick t/0", "undo quick"]


def test_a_group_does_not_start_past_the_deadline(run: Run) -> None:
    clock = FakeClock()

    def takes_long(ctx: Context) -> None:
        clock.sleep(100)

    reports: list[Report] = []
    setup = declsaga.new(
        {
            "first": takes_long,
            "x": logged("x"),
            "y": logged("y"),
            "undo-first": undo("first"),
        },
        sequence=["first", "x", "y"],
        parallel=[("x", "y")],
        compensators={"first": "undo-first"},
        deadline=10.0,
    )
    with pytest.raises(
        DeadlineExceeded,
        match=exactly("The saga's deadline of 10s passed at action 'x'; it rolls back."),
    ):
        run(Executor(clock=clock, reporter=reports.append), setup)
    assert LOG == ["undo first"]
    assert outcomes(reports[0].runs) == ["first <- undo-first", "undo-first"]


# -- durable execution -------------------------------------------------------------------------


class Recover(Protocol):
    def __call__(self, executor: Executor) -> list[declsaga.Recovered]: ...


def recover_blocking(executor: Executor) -> list[declsaga.Recovered]:
    return executor.recover()


def recover_async(executor: Executor) -> list[declsaga.Recovered]:
    return asyncio.run(executor.recover_async())


@pytest.fixture(params=["recover", "recover_async"])
def recover(request: pytest.FixtureRequest) -> Recover:
    return recover_blocking if request.param == "recover" else recover_async


def entries(store: Store, saga_id: str) -> list[str]:
    """The stored journal as `kind run` lines."""
    stored = store.load(saga_id)
    assert stored is not None
    shown = []
    for entry in stored.entries:
        kind = entry["kind"]
        if kind == "run_started":
            shown.append(f"started {entry['action']}")
        elif kind in ("run_succeeded", "run_failed"):
            shown.append(f"{kind.removeprefix('run_')} {entry['run']}")
        else:
            shown.append(kind)
    return shown


def committed(commits: Sequence[Commit]) -> list[list[str]]:
    """Each commit's entries as `kind run-or-action`."""
    return [
        [
            f"started {entry['action']}"
            if entry["kind"] == "run_started"
            else f"{entry['kind'].removeprefix('run_')} {entry.get('run', '')}".rstrip()
            for entry in commit.entries
        ]
        for commit in commits
    ]


def test_one_commit_starts_the_group_and_each_outcome_is_committed_as_it_comes(
    store: Store, run: Run, kind: str
) -> None:
    counting = Counting(store)
    setup = grouped("new", group_actions(kind=kind), name=f"parallel.commits.{run.mode}.{kind}")
    run(Executor(store=counting), setup, saga_id="c-1")
    assert committed(counting.commits) == [
        ["saga_started", "started a"],
        ["succeeded 0", "started b", "started c", "started d"],  # one commit for the group
        ["succeeded 3"],  # d, b, c: completion order
        ["succeeded 1"],
        ["succeeded 2"],
        ["started e"],
        ["succeeded 4", "saga_ended"],
    ]
    assert entries(store, "c-1") == [
        "saga_started",
        "started a",
        "succeeded 0",
        "started b",
        "started c",
        "started d",
        "succeeded 3",
        "succeeded 1",
        "succeeded 2",
        "started e",
        "succeeded 4",
        "saga_ended",
    ]


@pytest.mark.parametrize("landed", [False, True])
def test_recovery_after_a_crash_in_the_middle_of_a_group_reruns_only_unfinished_members(
    store: Store, run: Run, recover: Recover, kind: str, landed: bool
) -> None:
    setup = grouped("new", group_actions(kind=kind), name=f"parallel.crash.{kind}")
    # Commits: 1 a started, 2 the group started, 3 d done, 4 b done, 5 c done.
    with pytest.raises(StoreError, match=exactly(CRASH)):
        run(Executor(store=Crashing(store, 4, landed=landed)), setup, saga_id="m-1")
    assert LOG == ["a m-1/0", "d m-1/3", "b m-1/1", "c m-1/2"]  # every member ran
    stored = store.load("m-1")
    assert stored is not None
    assert stored.status == "running"
    del LOG[:]
    reports: list[Report] = []
    [recovered] = recover(Executor(store=store, reporter=reports.append))
    assert (recovered.status, recovered.error) == ("completed", None)
    if landed:  # d and b recorded: only c runs again, under its key
        assert LOG == ["c m-1/2", "e m-1/4"]
    else:  # only d recorded
        assert LOG == ["b m-1/1", "c m-1/2", "e m-1/4"]
    assert reports == [recovered.report]
    assert recovered.report is not None
    assert names(recovered.report.runs) == ["a", "d", "b", "c", "e"]
    assert entries(store, "m-1")[-6:] == [
        "succeeded 3",
        "succeeded 1",
        "succeeded 2",
        "started e",
        "succeeded 4",
        "saga_ended",
    ]


def test_a_crash_at_any_commit_of_a_group_recovers_to_the_same_end(
    store: Store, recover: Recover
) -> None:
    setup = grouped("new", group_actions(), name="parallel.sweep")
    finished_lines = {"a m/0", "d m/3", "b m/1", "c m/2", "e m/4"}
    for at in range(1, 8):
        for landed in (False, True):
            saga_id = f"m-{at}-{landed}"
            del LOG[:]
            with pytest.raises(StoreError, match=exactly(CRASH)):
                Executor(store=Crashing(store, at, landed=landed)).execute(setup, saga_id=saga_id)
            before = {line.replace(saga_id, "m") for line in LOG}
            at_crash = store.load(saga_id)
            del LOG[:]
            recovered = recover(Executor(store=store))
            after = [line.replace(saga_id, "m") for line in LOG]
            where = (at, landed)
            if at_crash is None:  # died before its first commit: nothing to do
                assert (recovered, after) == ([], []), where
                continue
            if at_crash.status == "completed":
                assert (recovered, after) == ([], []), where
            else:
                [one] = recovered
                assert (one.status, one.error) == ("completed", None), where
                assert one.report is not None
                assert names(one.report.runs) == ["a", "d", "b", "c", "e"], where
            done_before = {  # run ids: a 0, b 1, c 2, d 3, e 4
                f"{'abcde'[entry['run']]} m/{entry['run']}"
                for entry in at_crash.entries
                if entry["kind"] == "run_succeeded"
            }
            # Nothing recorded as finished runs again; the rest runs once more, with the
            # same keys; together they are the whole saga.
            assert done_before.isdisjoint(after), where
            assert len(set(after)) == len(after), where
            assert set(after) | done_before == finished_lines, where
            assert before <= finished_lines, where
            assert entries(store, saga_id)[-1] == "saga_ended", where


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_a_member_in_flight_at_a_crash_runs_to_its_end_despite_a_recorded_failure(
    store: Store, mode: str
) -> None:
    # b fails after d succeeded; c is awaited (execute) or cancelled (execute_async); the
    # crash loses both outcomes. Recovered, both run again, and c runs to its end although
    # b fails again (its first run may have done its work): it succeeds, so it is undone.
    setup = grouped("new", group_actions(kind="async", fails=["b"]), name=f"parallel.failed.{mode}")
    with pytest.raises(StoreError, match=exactly(CRASH)):
        execute(mode, Executor(store=Crashing(store, 4)), setup, "f-1")
    if mode == "execute":
        assert LOG == ["a f-1/0", "d f-1/3", "b f-1/1", "c f-1/2"]
    else:
        assert LOG == ["a f-1/0", "d f-1/3", "b f-1/1", "c cancelled"]
    assert entries(store, "f-1")[-1] == "succeeded 3"
    del LOG[:]
    recovered = (
        Executor(store=store).recover()
        if mode == "execute"
        else asyncio.run(Executor(store=store).recover_async())
    )
    [one] = recovered
    assert (one.status, type(one.error), str(one.error)) == ("compensated", Failed, "b")
    assert LOG == ["b f-1/1", "c f-1/2", "undo c", "undo d", "undo a"]
    assert one.report is not None
    assert outcomes(one.report.runs) == [
        "a <- undo-a",
        "d <- undo-d",
        "b failed: Failed",
        "c <- undo-c",
        "undo-c",
        "undo-d",
        "undo-a",
    ]


class Parcel(Saga, name="tests.parallel.Parcel"):
    """Two members that each write a field of their own."""

    label: str | None = None
    invoice: str | None = None

    @step(order=1, parallel=True)
    def print_label(self, ctx: Context) -> None:
        self.label = ctx.idempotency_key
        LOG.append(f"label {ctx.idempotency_key}")

    @step(order=1, parallel=True)
    def send_invoice(self, ctx: Context) -> None:
        wait_blocking(ctx, "print_label")
        self.invoice = ctx.idempotency_key
        LOG.append(f"invoice {ctx.idempotency_key}")


def test_fields_written_by_recorded_members_survive_the_rerun_of_the_others(
    store: Store, recover: Recover
) -> None:
    with pytest.raises(StoreError, match=exactly(CRASH)):
        Executor(store=Crashing(store, 3)).execute(Parcel(), saga_id="p-1")
    del LOG[:]
    [one] = recover(Executor(store=store))
    assert one.status == "completed"
    assert LOG == ["invoice p-1/1"]
    stored = store.load("p-1")
    assert stored is not None
    assert stored.header.fields == {"label": None, "invoice": None}
    saga = Parcel()  # the saga ended: executing its id again gives its final fields
    declsaga.Executor(store=store).execute(saga, saga_id="p-1")
    assert (saga.label, saga.invoice) == ("p-1/0", "p-1/1")
