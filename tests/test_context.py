"""SPEC §5: the `Context` every action receives, and the components it reaches.

Run through `new()` and the DSL (`build`), `execute` and `execute_async` (`run`), and
sync and async actions (`kind`), with sync and async components.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import declsaga
from declsaga import (
    Action,
    ActionNotFound,
    AggregateNotFound,
    Command,
    Context,
    Event,
    Executor,
    HandlerNotFound,
    InMemoryCommandBus,
    InMemoryEventBus,
    InMemoryRepository,
    MissingBus,
    MissingRepository,
    Report,
    SagaError,
)

if TYPE_CHECKING:
    from conftest import Build, Run

pytestmark = pytest.mark.usefixtures("no_async_leaks")

ActionFn = Callable[[Context], Any]


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def names(report: Report) -> list[str]:
    return [run.action for run in report.runs]


def current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


Where = tuple[int, asyncio.AbstractEventLoop | None]


def where() -> Where:
    return threading.get_ident(), current_loop()


def either(kind: str, sync: ActionFn, async_: ActionFn) -> ActionFn:
    return async_ if kind == "async" else sync


class Account:
    """An aggregate: any object with an `id`."""

    def __init__(self, id: str, balance: int = 0) -> None:
        self.id = id
        self.balance = balance


# Components written with async methods: the protocols admit them.


class AsyncEventBus:
    def __init__(self) -> None:
        self.published: list[Event] = []
        self.where: list[Where] = []

    async def publish(self, *events: Event) -> None:
        self.where.append(where())
        await asyncio.sleep(0)
        self.published.extend(events)


class AsyncCommandBus:
    def __init__(self, error: BaseException | None = None) -> None:
        self.where: list[Where] = []
        self.error = error

    async def dispatch(self, command: Command) -> object:
        self.where.append(where())
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return f"handled {command.name}"


class AsyncRepository:
    def __init__(self, balances: dict[str, int]) -> None:
        self.balances = balances
        self.where: list[Where] = []

    async def fetch(self, aggregate: Account) -> None:
        self.where.append(where())
        await asyncio.sleep(0)
        if aggregate.id not in self.balances:
            raise AggregateNotFound("Account", aggregate.id)
        aggregate.balance = self.balances[aggregate.id]


# -- ctx.action and ctx.saga_id -------------------------------------------------------------


def test_ctx_action_is_the_action_now_running(build: Build, run: Run, kind: str) -> None:
    seen: list[tuple[str, Action]] = []

    def record(name: str) -> ActionFn:
        def sync(ctx: Context) -> None:
            seen.append((name, ctx.action))
            if name == "a":
                ctx.run("x")
                seen.append((name, ctx.action))
            if name == "b":
                raise ValueError("b")

        async def async_(ctx: Context) -> None:
            seen.append((name, ctx.action))
            if name == "a":
                await ctx.run_async("x")
                seen.append((name, ctx.action))
            if name == "b":
                raise ValueError("b")

        return either(kind, sync, async_)

    setup = build(
        {name: record(name) for name in ("a", "b", "x", "undo_a")},
        sequence=["a", "b"],
        compensators={"a": "undo_a"},
    )
    with pytest.raises(ValueError, match=r"^b$"):
        run(Executor(), setup)
    assert [(name, act.name) for name, act in seen] == [
        ("a", "a"), ("x", "x"), ("a", "a"), ("b", "b"), ("undo_a", "undo_a")
    ]  # fmt: skip
    for name, act in seen:
        assert isinstance(act, Action)
        assert act == setup.action(name)


def test_ctx_saga_id_is_the_executions_id_in_every_run(build: Build, run: Run, kind: str) -> None:
    ids: list[str] = []

    def sync(ctx: Context) -> None:
        ids.append(ctx.saga_id)
        if ctx.action.name == "a":
            ctx.run("x")

    async def async_(ctx: Context) -> None:
        ids.append(ctx.saga_id)
        if ctx.action.name == "a":
            await ctx.run_async("x")

    fn = either(kind, sync, async_)
    setup = build({"a": fn, "x": fn}, sequence=["a"])
    run(Executor(), setup, saga_id="order-1")
    assert ids == ["order-1", "order-1"]
    ids.clear()
    run(Executor(), setup)
    assert ids[0] == ids[1]
    assert uuid.UUID(ids[0]).version == 4


def test_ctx_idempotency_key_differs_for_every_run(build: Build, run: Run, kind: str) -> None:
    keys: list[str] = []

    def sync(ctx: Context) -> None:
        keys.append(ctx.idempotency_key)
        if ctx.action.name == "a":
            ctx.run("x")
            ctx.run("x")

    async def async_(ctx: Context) -> None:
        keys.append(ctx.idempotency_key)
        if ctx.action.name == "a":
            await ctx.run_async("x")
            await ctx.run_async("x")

    fn = either(kind, sync, async_)
    setup = build({"a": fn, "x": fn, "b": fn}, sequence=["a", "b"])
    run(Executor(), setup, saga_id="s")
    run(Executor(), setup, saga_id="t")
    assert len(keys) == 8
    assert len(set(keys)) == 8
    assert all(isinstance(key, str) for key in keys)


# -- ctx.run / ctx.run_async ----------------------------------------------------------------


def test_ctx_run_returns_what_the_action_returned(build: Build, run: Run, kind: str) -> None:
    results: list[object] = []
    value = object()

    def sync_a(ctx: Context) -> None:
        results.append(ctx.run("sync_x"))
        results.append(ctx.run("async_x"))

    async def async_a(ctx: Context) -> None:
        results.append(await ctx.run_async("sync_x"))
        results.append(await ctx.run_async("async_x"))

    def sync_x(ctx: Context) -> object:
        return value

    async def async_x(ctx: Context) -> object:
        return value

    setup = build(
        {"a": either(kind, sync_a, async_a), "sync_x": sync_x, "async_x": async_x},
        sequence=["a"],
    )
    run(Executor(), setup)
    assert results == [value, value]
    assert all(result is value for result in results)


def test_ctx_run_raises_what_the_action_raised(build: Build, run: Run, kind: str) -> None:
    failure = LookupError("x failed")
    caught: list[BaseException] = []

    def sync_a(ctx: Context) -> None:
        try:
            ctx.run("x")
        except LookupError as error:
            caught.append(error)

    async def async_a(ctx: Context) -> None:
        try:
            await ctx.run_async("x")
        except LookupError as error:
            caught.append(error)

    def sync_x(ctx: Context) -> None:
        raise failure

    async def async_x(ctx: Context) -> None:
        raise failure

    setup = build(
        {"a": either(kind, sync_a, async_a), "x": either(kind, sync_x, async_x)}, sequence=["a"]
    )
    report = run(Executor(), setup)
    assert caught == [failure]
    assert caught[0] is failure
    assert names(report) == ["x", "a"]
    assert report.runs[0].error is failure


def test_ctx_run_of_an_unknown_name_raises_action_not_found(
    build: Build, run: Run, kind: str
) -> None:
    caught: list[BaseException] = []

    def sync_a(ctx: Context) -> None:
        try:
            ctx.run("nope")
        except ActionNotFound as error:
            caught.append(error)

    async def async_a(ctx: Context) -> None:
        try:
            await ctx.run_async("nope")
        except ActionNotFound as error:
            caught.append(error)

    report = run(Executor(), build({"a": either(kind, sync_a, async_a)}, sequence=["a"]))
    [error] = caught
    assert str(error) == "No action named 'nope' (run by 'a')."
    assert isinstance(error, LookupError)
    assert names(report) == ["a"]  # no run is recorded for the unknown name


def test_an_uncaught_action_not_found_fails_the_step(build: Build, run: Run, kind: str) -> None:
    log: list[str] = []

    def sync_a(ctx: Context) -> None:
        ctx.run("nope")

    async def async_a(ctx: Context) -> None:
        await ctx.run_async("nope")

    def undo_first(ctx: Context) -> None:
        log.append("undo_first")

    setup = build(
        {"first": lambda ctx: None, "a": either(kind, sync_a, async_a), "undo_first": undo_first},
        sequence=["first", "a"],
        compensators={"first": "undo_first"},
    )
    with pytest.raises(ActionNotFound, match=exactly("No action named 'nope' (run by 'a').")):
        run(Executor(), setup)
    assert log == ["undo_first"]


# -- blocking forms on an event loop ----------------------------------------------------------


@pytest.mark.parametrize("method", ["run", "publish", "dispatch", "fetch"])
def test_a_blocking_form_inside_an_async_action_names_the_async_form(
    build: Build, run: Run, method: str
) -> None:
    caught: list[BaseException] = []
    bus = AsyncEventBus()
    commands = AsyncCommandBus()
    repository = AsyncRepository({"acc": 1})

    async def a(ctx: Context) -> None:
        calls: dict[str, Callable[[], object]] = {
            "run": lambda: ctx.run("x"),
            "publish": lambda: ctx.publish(Event("e")),
            "dispatch": lambda: ctx.dispatch(Command("c")),
            "fetch": lambda: ctx.fetch(Account("acc")),
        }
        try:
            calls[method]()
        except SagaError as error:
            caught.append(error)

    x_ran: list[str] = []
    setup = build({"a": a, "x": lambda ctx: x_ran.append("x")}, sequence=["a"])
    executor = Executor(event_bus=bus, command_bus=commands, repository=repository)
    report = run(executor, setup)
    [error] = caught
    assert type(error) is SagaError
    assert str(error) == (
        f"ctx.{method}() blocks, but action 'a' runs on an event loop: "
        f"use 'await ctx.{method}_async(...)' instead."
    )
    # Refused before doing anything: no run, no component call.
    assert x_ran == []
    assert names(report) == ["a"]
    assert (bus.where, commands.where, repository.where) == ([], [], [])


# -- components: missing ----------------------------------------------------------------------


MISSING = [
    ("publish", MissingBus,
     "Action 'a' used the event bus, but the executor has none: pass event_bus= to Executor."),
    ("dispatch", MissingBus,
     "Action 'a' used the command bus, but the executor has none: pass command_bus= to Executor."),
    ("fetch", MissingRepository,
     "Action 'a' fetched an aggregate, but the executor has no repository: "
     "pass repository= to Executor."),
]  # fmt: skip


@pytest.mark.parametrize("case", MISSING, ids=lambda case: str(case[0]))
def test_a_component_the_executor_lacks_is_a_clear_error(
    build: Build, run: Run, kind: str, case: tuple[str, type[Exception], str]
) -> None:
    method, error_type, message = case
    caught: list[BaseException] = []

    def sync_a(ctx: Context) -> None:
        calls: dict[str, Callable[[], object]] = {
            "publish": lambda: ctx.publish(Event("e")),
            "dispatch": lambda: ctx.dispatch(Command("c")),
            "fetch": lambda: ctx.fetch(Account("acc")),
        }
        try:
            calls[method]()
        except SagaError as error:
            caught.append(error)

    async def async_a(ctx: Context) -> None:
        try:
            if method == "publish":
                await ctx.publish_async(Event("e"))
            elif method == "dispatch":
                await ctx.dispatch_async(Command("c"))
            else:
                await ctx.fetch_async(Account("acc"))
        except SagaError as error:
            caught.append(error)

    run(Executor(), build({"a": either(kind, sync_a, async_a)}, sequence=["a"]))
    [error] = caught
    assert type(error) is error_type
    assert str(error) == message


# -- components: publish ----------------------------------------------------------------------


def test_publish_delivers_events_on_the_in_memory_bus(build: Build, run: Run, kind: str) -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    placed, paid, shipped = Event("placed", 1), Event("paid", 2), Event("shipped", 3)

    def sync_a(ctx: Context) -> None:
        ctx.publish(placed, paid)
        ctx.publish(shipped)
        ctx.publish()

    async def async_a(ctx: Context) -> None:
        await ctx.publish_async(placed, paid)
        await ctx.publish_async(shipped)
        await ctx.publish_async()

    run(Executor(event_bus=bus), build({"a": either(kind, sync_a, async_a)}, sequence=["a"]))
    assert list(subscription) == [placed, paid, shipped]


def test_publish_awaits_an_async_bus(build: Build, run: Run, kind: str) -> None:
    bus = AsyncEventBus()
    event = Event("placed")

    def sync_a(ctx: Context) -> None:
        ctx.publish(event)

    async def async_a(ctx: Context) -> None:
        await ctx.publish_async(event)

    run(Executor(event_bus=bus), build({"a": either(kind, sync_a, async_a)}, sequence=["a"]))
    assert bus.published == [event]


# -- components: dispatch ---------------------------------------------------------------------


def test_dispatch_returns_the_handlers_result_and_raises_its_error(
    build: Build, run: Run, kind: str
) -> None:
    failure = PermissionError("no")
    commands = InMemoryCommandBus()
    commands.handle("reserve", lambda command: f"reserved {command.payload}")

    async def refuse(command: Command) -> None:
        raise failure

    commands.handle("refuse", refuse)
    results: list[object] = []

    def sync_a(ctx: Context) -> None:
        results.append(ctx.dispatch(Command("reserve", 3)))
        for name in ("refuse", "unknown"):
            try:
                ctx.dispatch(Command(name))
            except Exception as error:
                results.append(error)

    async def async_a(ctx: Context) -> None:
        results.append(await ctx.dispatch_async(Command("reserve", 3)))
        for name in ("refuse", "unknown"):
            try:
                await ctx.dispatch_async(Command(name))
            except Exception as error:
                results.append(error)

    run(
        Executor(command_bus=commands),
        build({"a": either(kind, sync_a, async_a)}, sequence=["a"]),
    )
    reserved, refused, unknown = results
    assert reserved == "reserved 3"
    assert refused is failure
    assert isinstance(unknown, HandlerNotFound)
    assert str(unknown) == "No handler is registered for command 'unknown'."


def test_dispatch_awaits_an_async_bus(build: Build, run: Run, kind: str) -> None:
    failure = TimeoutError("slow")
    results: list[object] = []

    def sync_a(ctx: Context) -> None:
        results.append(ctx.dispatch(Command("reserve")))

    async def async_a(ctx: Context) -> None:
        results.append(await ctx.dispatch_async(Command("reserve")))

    setup = build({"a": either(kind, sync_a, async_a)}, sequence=["a"])
    run(Executor(command_bus=AsyncCommandBus()), setup)
    assert results == ["handled reserve"]
    with pytest.raises(TimeoutError) as raised:
        run(Executor(command_bus=AsyncCommandBus(failure)), setup)
    assert raised.value is failure


# -- components: fetch ------------------------------------------------------------------------


def test_fetch_loads_the_aggregate_in_place(build: Build, run: Run, kind: str) -> None:
    repository = InMemoryRepository()
    repository.save(Account("acc-1", 40))
    account = Account("acc-1")
    results: list[object] = []

    def sync_a(ctx: Context) -> None:
        results.append(ctx.fetch(account))
        try:
            ctx.fetch(Account("acc-2"))
        except AggregateNotFound as error:
            results.append(error)

    async def async_a(ctx: Context) -> None:
        results.append(await ctx.fetch_async(account))
        try:
            await ctx.fetch_async(Account("acc-2"))
        except AggregateNotFound as error:
            results.append(error)

    run(
        Executor(repository=repository),
        build({"a": either(kind, sync_a, async_a)}, sequence=["a"]),
    )
    fetched, missing = results
    assert fetched is account
    assert account.balance == 40
    assert str(missing) == "No Account aggregate with id 'acc-2' is stored."


def test_fetch_awaits_an_async_repository(build: Build, run: Run, kind: str) -> None:
    account = Account("acc-1")

    def sync_a(ctx: Context) -> None:
        assert ctx.fetch(account) is account

    async def async_a(ctx: Context) -> None:
        assert await ctx.fetch_async(account) is account

    run(
        Executor(repository=AsyncRepository({"acc-1": 7})),
        build({"a": either(kind, sync_a, async_a)}, sequence=["a"]),
    )
    assert account.balance == 7


# -- where components run -------------------------------------------------------------------


def test_under_execute_components_used_by_sync_steps_run_on_the_private_loop(
    build: Build,
) -> None:
    bus, commands, repository = AsyncEventBus(), AsyncCommandBus(), AsyncRepository({"a": 1})
    loops: list[Where] = []

    def s(ctx: Context) -> None:
        loops.append(where())
        ctx.publish(Event("e"))
        ctx.dispatch(Command("c"))
        ctx.fetch(Account("a"))

    async def a(ctx: Context) -> None:
        loops.append(where())

    setup = build({"s": s, "a": a}, sequence=["s", "a"])
    Executor(event_bus=bus, command_bus=commands, repository=repository).execute(setup)
    (step_thread, step_loop), (_, private) = loops
    assert step_thread == threading.get_ident()
    assert step_loop is None
    assert private is not None
    # The async components ran on the execution's private loop.
    for component in (bus, commands, repository):
        [(_, loop)] = component.where
        assert loop is private


def test_blocking_forms_from_a_worker_thread_reach_async_components_through_the_loop(
    build: Build, run: Run
) -> None:
    bus, commands, repository = AsyncEventBus(), AsyncCommandBus(), AsyncRepository({"a": 1})
    seen: dict[str, Where] = {}

    async def a(ctx: Context) -> None:
        seen["a"] = where()
        await ctx.run_async("s")

    def s(ctx: Context) -> None:
        seen["s"] = where()
        ctx.publish(Event("e"))
        assert ctx.dispatch(Command("c")) == "handled c"
        ctx.fetch(Account("a"))

    setup = build({"a": a, "s": s}, sequence=["a"])
    run(Executor(event_bus=bus, command_bus=commands, repository=repository), setup)
    assert seen["s"][0] != seen["a"][0]
    for component in (bus, commands, repository):
        assert component.where == [seen["a"]]  # the executor's loop, on its thread


def test_async_forms_call_a_sync_component_directly(build: Build, run: Run) -> None:
    seen: list[Where] = []

    class SyncBus:
        def publish(self, *events: Event) -> None:
            seen.append(where())

    async def a(ctx: Context) -> None:
        seen.append(where())
        await ctx.publish_async(Event("e"))

    run(Executor(event_bus=SyncBus()), build({"a": a}, sequence=["a"]))
    action_where, bus_where = seen
    assert bus_where == action_where  # on the loop's thread, not offloaded


def test_sync_forms_call_a_sync_component_on_the_actions_thread(build: Build, run: Run) -> None:
    seen: list[Where] = []

    class SyncBus:
        def publish(self, *events: Event) -> None:
            seen.append(where())

    def s(ctx: Context) -> None:
        seen.append(where())
        ctx.publish(Event("e"))

    run(Executor(event_bus=SyncBus()), build({"s": s}, sequence=["s"]))
    action_where, bus_where = seen
    assert bus_where == action_where


# -- a context outlives its run ---------------------------------------------------------------


def test_a_context_refuses_calls_after_its_run_ended(build: Build, run: Run, kind: str) -> None:
    kept: list[Context] = []

    def sync_a(ctx: Context) -> None:
        kept.append(ctx)

    async def async_a(ctx: Context) -> None:
        kept.append(ctx)

    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    setup = build({"a": either(kind, sync_a, async_a), "x": lambda ctx: None}, sequence=["a"])
    run(Executor(event_bus=bus), setup, saga_id="s-9")
    [ctx] = kept

    def refused(method: str) -> str:
        return exactly(
            f"ctx.{method}() was called after the run of action 'a' ended (saga 's-9'); "
            "a context is valid only during its run."
        )

    with pytest.raises(SagaError, match=refused("run")):
        ctx.run("x")
    with pytest.raises(SagaError, match=refused("publish")):
        ctx.publish(Event("late"))
    with pytest.raises(SagaError, match=refused("dispatch")):
        ctx.dispatch(Command("late"))
    with pytest.raises(SagaError, match=refused("fetch")):
        ctx.fetch(Account("x"))

    async def late() -> None:
        with pytest.raises(SagaError, match=refused("run_async")):
            await ctx.run_async("x")
        with pytest.raises(SagaError, match=refused("publish_async")):
            await ctx.publish_async(Event("late"))
        with pytest.raises(SagaError, match=refused("dispatch_async")):
            await ctx.dispatch_async(Command("late"))
        with pytest.raises(SagaError, match=refused("fetch_async")):
            await ctx.fetch_async(Account("x"))

    asyncio.run(late())
    assert list(subscription) == []


def test_a_run_left_behind_cannot_act_after_the_saga_ended(build: Build) -> None:
    # A nested run started without being awaited outlives its caller and the saga.
    outcome: list[BaseException] = []
    started = asyncio.Event()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def a(ctx: Context) -> None:
        background.append(asyncio.ensure_future(ctx.run_async("orphan")))
        await started.wait()

    async def orphan(ctx: Context) -> None:
        started.set()
        await release.wait()
        try:
            await ctx.run_async("x")
        except SagaError as error:
            outcome.append(error)
        finally:
            finished.set()

    background: list[asyncio.Future[Any]] = []
    setup = build({"a": a, "orphan": orphan, "x": lambda ctx: None}, sequence=["a"])

    async def main() -> None:
        report = await Executor().execute_async(setup, saga_id="s-1")
        assert names(report) == ["a"]
        release.set()
        async with asyncio.timeout(5):
            await finished.wait()
        await asyncio.gather(*background, return_exceptions=True)

    asyncio.run(main())
    [error] = outcome
    assert str(error) == (
        "ctx.run_async() was called by action 'orphan' after saga 's-1' ended; "
        "a context is valid only during its run."
    )


# -- the components and actions of several sagas do not mix -------------------------------------


def test_concurrent_sagas_share_components_but_not_contexts(build: Build) -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    sagas = 20
    executor = Executor(event_bus=bus)

    def saga(i: int) -> declsaga.Setup:
        async def a(ctx: Context) -> None:
            await ctx.run_async("s")

        def s(ctx: Context) -> None:
            ctx.publish(Event("done", data=(ctx.saga_id, i)))

        return build({"a": a, "s": s}, sequence=["a"])

    async def main() -> None:
        await asyncio.gather(
            *(executor.execute_async(saga(i), saga_id=f"saga-{i}") for i in range(sagas))
        )

    asyncio.run(main())
    received = sorted(event.data for event in subscription)  # type: ignore[type-var]
    assert received == sorted((f"saga-{i}", i) for i in range(sagas))
