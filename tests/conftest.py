"""Fixtures shared by the executor and context suites.

Every end-to-end test runs through both ways of building a setup (`new()` and the `Saga`
DSL, the `build` fixture) and both entry points (`execute` and `execute_async`, the
`run` fixture); `act` writes scripted actions, sync or async (the `kind` fixture).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
from pg import postgres_store

import declsaga
from declsaga import Context, Executor, Report, Saga, Setup, SQLiteStore
from declsaga.stores import MemoryStore, Store

ActionFn = Callable[[Context], Any]


class Build(Protocol):
    """Builds a setup from plain functions of `ctx`, with `new()` or as a `Saga` class."""

    api: str

    def __call__(
        self,
        actions: Mapping[str, ActionFn],
        *,
        sequence: Sequence[str],
        compensators: Mapping[str, str] | None = None,
    ) -> Setup: ...


class Run(Protocol):
    """Runs a setup to its end with `execute` or `execute_async`, from synchronous code."""

    mode: str

    def __call__(
        self, executor: Executor, setup: Setup, *, saga_id: str | None = None
    ) -> Report: ...


class Act(Protocol):
    """Writes a scripted action: it logs its name, runs `calls` through ctx, then raises
    `raises` or returns `returns`. `catch=True` logs and swallows a nested failure."""

    kind: str

    def __call__(
        self,
        name: str,
        *,
        calls: Sequence[str] = (),
        raises: BaseException | None = None,
        returns: object = None,
        catch: bool = False,
        kind: str | None = None,
    ) -> ActionFn: ...


# -- building setups ----------------------------------------------------------------------


def _new(
    actions: Mapping[str, ActionFn],
    *,
    sequence: Sequence[str],
    compensators: Mapping[str, str] | None = None,
) -> Setup:
    return declsaga.new(actions, sequence=sequence, compensators=compensators)


def method_of(fn: ActionFn) -> Callable[..., Any]:
    """A method that delegates to `fn`, async exactly when `fn` is."""
    if inspect.iscoroutinefunction(fn):

        async def async_method(self: Saga, ctx: Context) -> Any:
            return await fn(ctx)

        return async_method

    def method(self: Saga, ctx: Context) -> Any:
        return fn(ctx)

    return method


def _dsl(
    actions: Mapping[str, ActionFn],
    *,
    sequence: Sequence[str],
    compensators: Mapping[str, str] | None = None,
) -> Setup:
    """The same setup as a `Saga` subclass: @step for the sequence, @compensates for the
    compensators, @action for the rest (method names differ from action names on purpose)."""
    compensators = dict(compensators or {})
    undoes = {compensator: target for target, compensator in compensators.items()}
    assert len(undoes) == len(compensators), "the DSL gives each compensator one action"
    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": "Scripted"}
    for index, (name, fn) in enumerate(actions.items()):
        method = method_of(fn)
        if name in sequence:
            assert name not in undoes, "a DSL method is one step, compensator or action"
            marked = declsaga.step(order=sequence.index(name), name=name)(method)
        elif name in undoes:
            marked = declsaga.compensates(undoes[name], name=name)(method)
        else:
            marked = declsaga.action(name=name)(method)
        namespace[f"method_{index}"] = marked
    cls: type[Saga] = type("Scripted", (Saga,), namespace)
    saga = cls()
    assert list(saga.sequence()) == list(sequence), "the DSL sequence is the steps by order"
    return saga


class _Build:
    def __init__(self, api: str) -> None:
        self.api = api

    def __call__(
        self,
        actions: Mapping[str, ActionFn],
        *,
        sequence: Sequence[str],
        compensators: Mapping[str, str] | None = None,
    ) -> Setup:
        make = _new if self.api == "new" else _dsl
        return make(actions, sequence=sequence, compensators=compensators)


@pytest.fixture(params=["new", "dsl"])
def build(request: pytest.FixtureRequest) -> Build:
    return _Build(request.param)


# -- running them -------------------------------------------------------------------------


class _Run:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, executor: Executor, setup: Setup, *, saga_id: str | None = None) -> Report:
        if self.mode == "execute":
            return executor.execute(setup, saga_id=saga_id)
        return asyncio.run(executor.execute_async(setup, saga_id=saga_id))


@pytest.fixture(params=["execute", "execute_async"])
def run(request: pytest.FixtureRequest) -> Run:
    return _Run(request.param)


# -- scripted actions ---------------------------------------------------------------------


class _Act:
    def __init__(self, log: list[str], kind: str) -> None:
        self.log = log
        self.kind = kind

    def __call__(
        self,
        name: str,
        *,
        calls: Sequence[str] = (),
        raises: BaseException | None = None,
        returns: object = None,
        catch: bool = False,
        kind: str | None = None,
    ) -> ActionFn:
        log = self.log

        def sync_action(ctx: Context) -> object:
            log.append(name)
            for call in calls:
                try:
                    ctx.run(call)
                except Exception as error:
                    if not catch:
                        raise
                    log.append(f"{name} caught {error}")
            if raises is not None:
                raise raises
            return returns

        async def async_action(ctx: Context) -> object:
            log.append(name)
            for call in calls:
                try:
                    await ctx.run_async(call)
                except Exception as error:
                    if not catch:
                        raise
                    log.append(f"{name} caught {error}")
            if raises is not None:
                raise raises
            return returns

        return async_action if (kind or self.kind) == "async" else sync_action


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def log() -> list[str]:
    return []


@pytest.fixture
def act(log: list[str], kind: str) -> Act:
    return _Act(log, kind)


# -- hygiene ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def _asyncio_problems() -> Iterator[list[logging.LogRecord]]:
    handler = _Collect()
    loggers = [logging.getLogger("asyncio"), logging.getLogger("concurrent.futures")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
        gc.collect()  # destroyed-while-pending tasks report when they are collected
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [record.getMessage() for record in handler.records] == []


@pytest.fixture
def no_async_leaks(_asyncio_problems: list[logging.LogRecord]) -> Iterator[None]:
    """Fail a test after which asyncio or concurrent.futures logged a problem (a task
    destroyed while pending, an exception nobody retrieved, a failing future callback).
    Tests that leave tasks or threads behind on purpose call gc.collect() themselves;
    the module's end collects once more for the rest."""
    del _asyncio_problems[:]
    yield
    problems = [record.getMessage() for record in _asyncio_problems]
    del _asyncio_problems[:]
    assert problems == []


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event that blocked threads wait on; set at teardown so no thread outlives a test."""
    event = threading.Event()
    yield event
    event.set()


# -- stores -----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each store of declsaga in turn: PostgreSQL's on a fresh schema, dropped afterwards."""
    if request.param == "postgres":
        with postgres_store(lease=5.0) as on_server:
            yield on_server
        return
    made: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "s.db")
    yield made
    made.close()
