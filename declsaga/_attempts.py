"""Running one run of an action under its policy: retries, a timeout, the saga's deadline.

The drivers of `_execution` call these only for actions that have a policy, or when the
saga has a deadline; every other run takes the drivers' own short path. An attempt that
fails and is retried is recorded (`AttemptFailed`, committed at once, so that a crash
does not reset the count) and the run stays open; the next attempt starts from the
fields as they were when the run started (except in a parallel group, where the other
members may have changed them meanwhile: there it starts from the fields as they are),
after the retry's delay, read from the executor's clock. A timeout cancels an async
action; a sync one cannot be stopped, so it runs in a worker thread that is abandoned at
the timeout, its late outcome discarded.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from . import _threads
from ._codec import Unencodable, apply_fields, encode_fields
from ._context import Context
from ._dsl import Saga
from ._errors import DeadlineExceeded, StepTimeout
from ._journal import AttemptFailed
from ._loops import capture

if TYPE_CHECKING:
    from ._execution import Execution
    from ._policies import ActionPolicy, Clock, Retry
    from ._setup import Action

__all__ = ["Limits", "attempt_async", "attempt_blocking", "late"]

logger = logging.getLogger("declsaga")


@attrs.define
class Limits:
    """An execution's clock and deadline, and how to find an action's policy."""

    clock: Clock
    deadline: float | None  # seconds, from the saga's first start
    deadline_at: float | None  # the clock's reading when it passes
    policy_of: Callable[[str], ActionPolicy | None] | None
    # Whether steps may need the long path (a policy or a deadline); compensations
    # always take it, for the default compensator retry.
    steps: bool = True

    def policy(self, name: str) -> ActionPolicy | None:
        return None if self.policy_of is None else self.policy_of(name)

    def past_deadline(self) -> bool:
        return self.deadline_at is not None and self.clock.monotonic() >= self.deadline_at

    def bound(
        self, action: str, policy: ActionPolicy | None, *, forward: bool
    ) -> tuple[float, BaseException] | None:
        """The time this attempt may take, and the error it fails with past it; None
        for no limit. The deadline bounds forward steps only: a rollback runs within
        its own budget."""
        timeout = None if policy is None else policy.timeout
        bound: tuple[float, BaseException] | None = None
        if timeout is not None:
            bound = (timeout, StepTimeout(action, timeout))
        if forward and self.deadline_at is not None and self.deadline is not None:
            left = max(0.0, self.deadline_at - self.clock.monotonic())
            if bound is None or left < bound[0]:
                bound = (left, DeadlineExceeded(action, self.deadline))
        return bound


def _first_attempt(execution: Execution, run: int) -> tuple[int, float]:
    """The attempt a run starts with (1, or the next after those recorded before a
    crash) and the seconds still to wait before it."""
    last = execution.last_attempt.get(run)
    if last is None:
        return 1, 0.0
    return last.attempt + 1, max(0.0, last.at + last.delay - perf_counter())


class _Fields:
    """The saga's fields when a run started, to start each retry from."""

    def __init__(self, execution: Execution) -> None:
        self.saga = execution.setup if isinstance(execution.setup, Saga) else None
        self.saved: Any = None
        if self.saga is None:
            return
        try:  # JSON, as a store would keep them: exact, and safe from later mutation
            self.saved = ("json", encode_fields(self.saga))
        except Unencodable:  # without a store, fields need not be encodable
            self.saved = ("copy", copy.deepcopy(attrs.asdict(self.saga, recurse=False)))

    def restore(self) -> None:
        if self.saga is None:
            return
        kind, saved = self.saved
        if kind == "json":
            apply_fields(self.saga, saved)
        else:
            for name, value in copy.deepcopy(saved).items():
                setattr(self.saga, name, value)


class _Run:
    """One run's attempts: which one is next, and what happens when one fails."""

    def __init__(
        self,
        execution: Execution,
        action: Action,
        run: int,
        limits: Limits,
        *,
        default: Retry | None,
        budget_left: Callable[[], float] | None,
        restore: bool = True,
    ) -> None:
        self.execution = execution
        self.run = run
        self.limits = limits
        self.budget_left = budget_left
        self.policy = limits.policy(action.name)
        retry = self.policy.retry if self.policy is not None else None
        self.retry = default if retry is None else retry
        self.attempt, self.wait = _first_attempt(execution, run)
        self.fields = _Fields(execution) if self.retry is not None and restore else None

    def failed(self, error: BaseException) -> float | None:
        """Record attempt `attempt`'s failure: the run's, and None, if it fails for
        good; else the retry to come, and the seconds to wait before it."""
        delay = self._next_delay(error)
        if delay is None:
            self.execution.fail_run(self.run, error)
            return None
        record = AttemptFailed(self.run, self.attempt, error, delay, perf_counter())
        self.execution.last_attempt[self.run] = record
        self.execution.append(record)
        return delay

    def again(self) -> None:
        """After the wait: the next attempt starts from the run's first fields."""
        if self.fields is not None:
            self.fields.restore()
        self.attempt += 1

    def _next_delay(self, error: BaseException) -> float | None:
        # Past the deadline a step is not retried; a compensation is, within its budget.
        retry = self.retry
        if retry is None or not retry.retries(error, self.attempt):
            return None
        if self.budget_left is None and self.limits.past_deadline():
            return None
        delay = retry.delay(self.attempt, random.random())  # jitter: no secret here
        if self.budget_left is not None and delay >= self.budget_left():
            return None  # the rollback's budget would run out while waiting
        return delay


def attempt_blocking(
    execution: Execution, action: Action, run: int, limits: Limits, default: Retry | None = None
) -> None:
    """Run `run` of `action` on the calling thread until it succeeds or fails for good;
    record its outcome."""
    state = _Run(execution, action, run, limits, default=default, budget_left=None)
    if state.wait:
        limits.clock.sleep(state.wait)
    while True:
        ctx = Context(execution, action, run, attempt=state.attempt)
        try:
            bound = limits.bound(action.name, state.policy, forward=True)
            result = (
                execution.invoke_blocking(action, ctx)
                if bound is None
                else _within_blocking(execution, action, ctx, bound)
            )
        except BaseException as error:
            ctx._closed = True
            delay = state.failed(error)
            if delay is None:
                return
            if execution.parks(delay) and (parked := execution.park(delay)) is not None:
                raise parked from None
            execution.commit()  # the count survives a crash
            if execution.stop_cancelled(run):
                return
            limits.clock.sleep(delay)
            state.again()
            continue
        ctx._closed = True
        execution.finish_run(run, result)
        return


async def attempt_async(
    execution: Execution,
    action: Action,
    run: int,
    limits: Limits,
    *,
    default: Retry | None = None,
    budget_left: Callable[[], float] | None = None,
    abandonable: bool = False,
    contexts: list[Context] | None = None,
    restore: bool = True,
) -> None:
    """`attempt_blocking` from the loop. For a compensation: `budget_left()` is the
    seconds its rollback may still spend, which no retry delay may exceed, and each
    attempt's context is appended to `contexts`. `restore=False` (a parallel group's
    member): a retry does not put the saga's fields back."""
    state = _Run(
        execution, action, run, limits, default=default, budget_left=budget_left, restore=restore
    )
    if state.wait:
        await limits.clock.sleep_async(state.wait)
    while True:
        ctx = Context(execution, action, run, attempt=state.attempt, abandonable=abandonable)
        if contexts is not None:  # the caller closes it if it abandons the run
            contexts.append(ctx)
        try:
            bound = limits.bound(action.name, state.policy, forward=budget_left is None)
            result = await _within_async(execution, action, ctx, bound)
        except asyncio.CancelledError:
            ctx._closed = True
            raise  # the caller's cancellation, not a failure of this attempt
        except BaseException as error:
            ctx._closed = True
            delay = state.failed(error)
            if delay is None:
                return
            await execution.commit_async()
            if budget_left is None and execution.stop_cancelled(run):
                return
            await limits.clock.sleep_async(delay)
            state.again()
            continue
        ctx._closed = True
        execution.finish_run(run, result)
        return


def _within_blocking(
    execution: Execution, action: Action, ctx: Context, bound: tuple[float, BaseException]
) -> object:
    seconds, error = bound
    if action.is_async:  # on the private loop, where a timeout can cancel it
        outcome = action.fn(ctx)
        return execution.block_on(_cancel_after(outcome, seconds, error))
    future: Future[Any] = _threads.submit(capture, execution.invoke_blocking, action, ctx)
    try:
        succeeded, value = future.result(timeout=seconds)
    except FutureTimeout:
        future.add_done_callback(late(action.name))
        raise error from None
    if succeeded:
        return value
    raise value


async def _within_async(
    execution: Execution, action: Action, ctx: Context, bound: tuple[float, BaseException] | None
) -> object:
    if bound is None:
        return await execution.invoke_async(action, ctx, abandonable=ctx._abandonable)
    seconds, error = bound
    # A sync action is abandoned at its timeout: nothing waits for its thread.
    return await _cancel_after(
        execution.invoke_async(action, ctx, abandonable=True), seconds, error
    )


async def _cancel_after(awaitable: Any, seconds: float, error: BaseException) -> object:
    try:
        async with asyncio.timeout(seconds) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise error from None
        raise


def late(action: str) -> Any:
    """A callback for the future of an abandoned sync run: it logs the late outcome,
    which nothing records (the run already failed)."""

    def log(future: Future[Any] | asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        succeeded, value = future.result()
        logger.warning(
            "Action %r finished after it was abandoned; its %s is discarded.",
            action,
            "result" if succeeded else f"error ({value!r})",
        )

    return log
