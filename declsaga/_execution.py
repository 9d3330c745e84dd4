"""One execution of a setup: its journal, how actions are called, its event loop.

The drivers (`_drivers`) act on what the engine decides through it; every outcome goes
through `finish_run` / `fail_run`, which drop a run's second outcome (an abandoned
compensator finishing late) and anything after the journal is sealed. Commits go to the
durable log, if any, before the execution acts on what they record.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from inspect import isawaitable
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import _threads
from ._attempts import Limits, late
from ._codec import apply_fields
from ._context import Context
from ._dsl import Saga
from ._engine import Finish, engine_for
from ._errors import (
    Abandoned,
    ActionNotFound,
    CancelRequested,
    Parked,
    SagaCancelled,
    SagaError,
)
from ._journal import (
    AttemptFailed,
    Record,
    Role,
    RunFailed,
    RunStarted,
    RunSucceeded,
    SagaEnded,
    SagaStarted,
)
from ._loops import (
    as_coroutine,
    cancel_leftovers,
    capture,
    captured,
    close_loop,
    consume,
    finish_loop,
    unwrap,
    wait_uncancellable,
)
from ._policies import SystemClock

if TYPE_CHECKING:
    from ._components import AggregateRepository, CommandBus, EventBus
    from ._durable import DurableLog, Replay
    from ._setup import Action, Setup

__all__ = ["Execution"]

# Without an executor's limits: the real clock, no deadline, no policies.
_NO_LIMITS = Limits(SystemClock(), None, None, None, steps=False)

T = TypeVar("T")

# Builds a journal record from a tuple of its fields: a NamedTuple's own constructor is a
# Python function, a measurable share of a no-op step's cost.
_new_record: Any = tuple.__new__


class Execution:
    """The runtime state of one execution; the executor itself holds none."""

    __slots__ = (
        "_lock",
        "_loop",
        "_loop_closing",
        "_loop_thread",
        "_next_run",
        "_open",
        "_replay",
        "_sealed",
        "cancelled",
        "command_bus",
        "compensate_timeout",
        "engine",
        "event_bus",
        "last_attempt",
        "limits",
        "log",
        "park_after",
        "records",
        "repository",
        "saga_id",
        "setup",
        "stop_when",
    )

    def __init__(
        self,
        setup: Setup,
        saga_id: str,
        *,
        repository: AggregateRepository | None,
        event_bus: EventBus | None,
        command_bus: CommandBus | None,
        compensate_timeout: float,
        loop: asyncio.AbstractEventLoop | None,
        log: DurableLog | None = None,
        replay: Replay | None = None,
        limits: Limits = _NO_LIMITS,
    ) -> None:
        self.setup = setup
        self.saga_id = saga_id
        self.repository = repository
        self.event_bus = event_bus
        self.command_bus = command_bus
        self.compensate_timeout = compensate_timeout
        self.engine = engine_for(setup)
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._next_run = 0
        self._open: set[int] = set()  # started runs without an outcome: each outcome's token
        self._sealed = False
        # The loop that async actions run on: the caller's under execute_async; under
        # execute a private one, created on first need and owned by the calling thread.
        self._loop = loop
        # Only a private loop has an owner thread. Under execute_async no thread owns the
        # loop here: a durable execution is set up in a worker thread, which may later run
        # a sync action whose blocking calls must go through the caller's loop.
        self._loop_thread = threading.get_ident() if loop is None else None
        self._loop_closing = False  # set under _lock: the private loop takes no more work
        self.log = log  # with a store: where the journal goes
        self._replay = replay  # resuming: what the stored journal recorded
        # A worker's stop signal: once set, the saga is left at its next step boundary.
        self.stop_when: threading.Event | None = None
        # The clock, the policies and the deadline (see _attempts.Limits).
        self.limits = limits
        self.cancelled = False  # a store refused a commit: cancel() was asked
        # Set by a worker: a retry delay this long or longer parks the saga in the store
        # (no thread, no claim held while it waits) instead of sleeping.
        self.park_after: float | None = None
        self.last_attempt: dict[int, AttemptFailed] = {}  # run -> its last failed attempt
        if replay is None:
            self.append(SagaStarted(saga_id, datetime.now(UTC), perf_counter()))
            return
        for record in replay.records:
            self.records.append(record)
            self.engine.apply(record)
            if type(record) is AttemptFailed:
                self.last_attempt[record.run] = record
            elif type(record) is RunStarted:
                self._open.add(record.run)
                self._next_run = record.run + 1
            elif type(record) is RunSucceeded or type(record) is RunFailed:
                self._open.discard(record.run)

    # -- the journal -----------------------------------------------------------------------

    def append(self, record: Record) -> None:
        with self._lock:
            if not self._sealed:
                self.records.append(record)
                self.engine.apply(record)
                if self.log is not None:
                    self.log.add(record)

    @property
    def ended(self) -> bool:
        """True once the journal is sealed: the outcome is decided, nothing more runs."""
        return self._sealed

    def start_run(
        self,
        action: str,
        role: Role,
        *,
        parent: int | None = None,
        index: int | None = None,
        target: int | None = None,
        at: float | None = None,
    ) -> int:
        with self._lock:
            if self._sealed:
                raise SagaError(f"Saga {self.saga_id!r} has ended: action {action!r} cannot run.")
            run = self._next_run
            self._next_run = run + 1
            record: RunStarted = _new_record(
                RunStarted,
                (run, action, role, parent, index, target, perf_counter() if at is None else at),
            )
            self.records.append(record)
            self.engine.run_started(record)
            self._open.add(run)
            if self.log is not None:
                self.log.add(record)
            return run

    def finish_run(self, run: int, result: object) -> BaseException | None:
        """Record a success; return the error it became if the journal cannot store it."""
        recorded = self._outcome(run, _new_record(RunSucceeded, (run, result, perf_counter())))
        return recorded.error if type(recorded) is RunFailed else None

    def fail_run(self, run: int, error: BaseException, *, at: float | None = None) -> None:
        self._outcome(run, RunFailed(run, error, perf_counter() if at is None else at))

    def _outcome(
        self, run: int, record: RunSucceeded | RunFailed
    ) -> RunSucceeded | RunFailed | None:
        with self._lock:
            if self._sealed or run not in self._open:
                return None  # a late or second outcome: the first one recorded stands
            self._open.discard(run)
            if self.log is not None:
                record = self.log.outcome(record, self.engine.action_of(run))
            self.records.append(record)
            if type(record) is RunSucceeded:
                self.engine.run_succeeded(record)
            elif type(record) is RunFailed:
                self.engine.run_failed(record)
            return record

    def seal(self, decision: Finish) -> None:
        """Record the end; nothing is appended after it."""
        with self._lock:
            record = SagaEnded(decision.status, decision.error, perf_counter())
            self.records.append(record)
            self.engine.apply(record)
            self._sealed = True
            if self.log is not None:
                self.log.add(record)

    def abandon(self) -> Abandoned:
        """At a step boundary, for a stopping worker: the journal so far is committed
        (the last step's outcome included, the next step not started), and the error
        that stops the execution like a crash is returned, to be raised."""
        self.commit()
        return Abandoned(self.saga_id)

    async def abandon_async(self) -> Abandoned:
        """`abandon` from the loop."""
        await self.commit_async()
        return Abandoned(self.saga_id)

    def commit(self) -> None:
        """Make the journal durable so far; done before acting on what it records. If
        the store refuses it because the saga was cancelled, `cancelled` is set and the
        records wait for the next commit: the drivers then stop the saga forward."""
        if self.log is not None:
            try:
                self.log.commit(self.engine.status)
            except CancelRequested:
                self.cancelled = True

    async def commit_async(self) -> None:
        """`commit` from the loop, which it never blocks (see DurableLog.commit_async)."""
        if self.log is not None:
            try:
                await self.log.commit_async(self.engine.status)
            except CancelRequested:
                self.cancelled = True

    def parks(self, delay: float) -> bool:
        """Whether to park the saga for a retry `delay` rather than wait for it here."""
        return self.log is not None and self.park_after is not None and delay >= self.park_after

    def park(self, delay: float) -> Parked | None:
        """Commit what was recorded with the time the next attempt is due, and return
        the error to raise, which stops the execution as a crash would. None if the
        store refused the commit for a cancel: then the saga rolls back instead."""
        assert self.log is not None
        due = time.time() + delay
        try:
            self.log.commit(self.engine.status, due=due)
        except CancelRequested:
            self.cancelled = True
            return None
        return Parked(self.saga_id, due)

    def stop_cancelled(self, run: int) -> bool:
        """After the commit before `run` executes: if the saga was cancelled, the run
        fails with `SagaCancelled` without executing (and the rollback follows)."""
        if not self.cancelled:
            return False
        self.fail_run(run, SagaCancelled(self.saga_id))
        return True

    def restore_fields(self, run: int) -> None:
        """Before a run executes again: the fields as they were when it first started."""
        if self._replay is not None and isinstance(self.setup, Saga):
            apply_fields(self.setup, self._replay.fields_before[run])

    # -- calling actions -------------------------------------------------------------------

    def invoke_blocking(self, action: Action, ctx: Context) -> object:
        """Call an action on this thread; an awaitable it returns is run to completion."""
        outcome = action.fn(ctx)
        if outcome is not None and isawaitable(outcome):  # None: the common case, cheaply
            return self.block_on(outcome)
        return outcome

    async def invoke_async(self, action: Action, ctx: Context, *, abandonable: bool) -> object:
        """Call an action from the loop; a sync one runs in a worker thread."""
        if action.is_async:
            outcome = action.fn(ctx)
            if outcome is not None and isawaitable(outcome):
                return await cast(Awaitable[object], outcome)
            return outcome
        future = _threads.submit(capture, self.invoke_blocking, action, ctx)
        waiter = asyncio.wrap_future(future)
        try:
            # Shielded: cancelling the caller must not cancel the thread's future.
            captured = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if abandonable or future.cancel():
                waiter.add_done_callback(consume)
                future.add_done_callback(late(action.name))  # runs on the thread's side
                raise
            # The thread cannot be interrupted: record its real outcome, then propagate.
            await wait_uncancellable(waiter)
            succeeded, value = waiter.result()
            if succeeded:
                self.finish_run(ctx._run, value)
            else:
                self.fail_run(ctx._run, cast(BaseException, value))
            raise
        return unwrap(captured)

    def _nested(self, ctx: Context, name: str) -> tuple[Action, Context] | RunSucceeded | RunFailed:
        """The run of `ctx.run(name)`: a new one, one to execute again, or a recorded outcome."""
        action = self.setup.action(name)
        if action is None:
            raise ActionNotFound(name, role=f"run by {ctx.action.name!r}")
        index = ctx._calls
        ctx._calls += 1
        recorded = None if self._replay is None else self._replay.calls.get((ctx._run, index))
        if recorded is None:
            run = self.start_run(action.name, Role.CALL, parent=ctx._run, index=index)
            return action, Context(self, action, run, abandonable=ctx._abandonable)
        assert self._replay is not None
        if self.engine.action_of(recorded) != action.name:
            raise SagaError(
                f"Saga {self.saga_id!r}: action {ctx.action.name!r} now runs {name!r} as its "
                f"call number {index + 1}, where its journal recorded "
                f"{self.engine.action_of(recorded)!r}; concurrent nested calls must start in a "
                "deterministic order."
            )
        outcome = self._replay.outcomes.get(recorded)
        if outcome is None:  # in flight at the crash: it runs again, under its own id
            return action, Context(self, action, recorded, abandonable=ctx._abandonable)
        if isinstance(self.setup, Saga):
            apply_fields(self.setup, self._replay.fields_after[recorded])
        return outcome

    def call_blocking(self, parent: Context, name: str) -> Any:
        found = self._nested(parent, name)
        if isinstance(found, RunSucceeded | RunFailed):
            return _recorded(found)
        action, ctx = found
        self.commit()
        if self.stop_cancelled(ctx._run):
            raise SagaCancelled(self.saga_id)
        try:
            result = self.invoke_blocking(action, ctx)
        except BaseException as error:
            self.fail_run(ctx._run, error)
            self.commit()
            raise
        finally:
            ctx._closed = True
        failure = self.finish_run(ctx._run, result)
        self.commit()
        if failure is not None:
            raise failure
        return result

    async def call_async(self, parent: Context, name: str) -> Any:
        found = self._nested(parent, name)
        if isinstance(found, RunSucceeded | RunFailed):
            return _recorded(found)
        action, ctx = found
        await self.commit_async()
        if self.stop_cancelled(ctx._run):
            raise SagaCancelled(self.saga_id)
        try:
            result = await self.invoke_async(action, ctx, abandonable=ctx._abandonable)
        except BaseException as error:
            self.fail_run(ctx._run, error)
            await self.commit_async()
            raise
        finally:
            ctx._closed = True
        failure = self.finish_run(ctx._run, result)
        await self.commit_async()
        if failure is not None:
            raise failure
        return result

    # -- event loops -----------------------------------------------------------------------

    def block_on(self, awaitable: Awaitable[T]) -> T:
        """Wait for `awaitable` on the execution's loop, from a thread not running a loop."""
        coroutine = as_coroutine(awaitable)
        if threading.get_ident() == self._loop_thread:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(coroutine)
            try:
                return self._loop.run_until_complete(task)
            except BaseException:
                if not task.done():
                    # Interrupted from outside (a KeyboardInterrupt from a signal, say):
                    # stop the run before anything else happens, as asyncio.run does.
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        self._loop.run_until_complete(task)
                raise
        wrapper = captured(coroutine)
        with self._lock:  # close_private_loop sets _loop_closing under it
            loop = self._loop
            try:
                if loop is None or self._loop_closing:
                    raise RuntimeError("Event loop is closed")
                future = asyncio.run_coroutine_threadsafe(wrapper, loop)
            except RuntimeError:  # no loop, or the caller's loop is closed
                wrapper.close()  # never awaited, on purpose: no warning
                coroutine.close()
                raise SagaError(
                    f"Saga {self.saga_id!r} has no running event loop to wait on."
                ) from None
        return cast(T, unwrap(future.result()))

    def close_private_loop(self) -> None:
        """Close the loop that `execute` created, once what is left on it is cancelled.

        Left on it: compensators abandoned by the budget, async runs started from an
        abandoned sync compensator's thread, tasks an action did not await. They are
        cancelled; one that does not end promptly is left to finish on a daemon thread
        that then closes the loop, so `execute` returns at once, as for a sync one.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or loop.is_running():
            return
        with self._lock:
            self._loop_closing = True  # from now on, no thread schedules work on it
        try:
            settled = loop.run_until_complete(cancel_leftovers())
        except BaseException:
            close_loop(loop)
            raise
        if settled:
            close_loop(loop)
        else:
            threading.Thread(
                target=finish_loop, args=(loop,), name="declsaga-abandoned", daemon=True
            ).start()


def _recorded(outcome: RunSucceeded | RunFailed) -> Any:
    """What a nested call recorded before a crash returns, or raises, when replayed."""
    if isinstance(outcome, RunFailed):
        raise outcome.error
    return outcome.result
