"""Parallel step groups: running the members of one group together.

Both forward drivers of `_execution` run a group here, on an event loop: under
`execute_async` the caller's, under `execute` the private one (`block_on`). Async
members are tasks; sync members run in worker threads (through `invoke_async`). Each
member records its own outcome as it ends (completion order) and commits it at once;
the group returns once every member has its outcome, and the engine then decides what
follows (the next step, or the rollback with the first failure).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ._attempts import attempt_async
from ._context import Context
from ._errors import DeadlineExceeded
from ._journal import Role, RollbackStarted
from ._loops import captured

if TYPE_CHECKING:
    from ._engine import RunGroup
    from ._execution import Execution
    from ._setup import Action

__all__ = ["run_group"]


async def run_group(execution: Execution, decision: RunGroup, *, cancel_on_failure: bool) -> None:
    """Run a group's members together until each has an outcome.

    Their runs start together, in ONE commit; each outcome is recorded when it comes
    (completion order) and committed at once. With `cancel_on_failure` (asyncio),
    the first failure cancels the async members still running; sync members run in
    worker threads, which cannot be interrupted: they are awaited. A member that
    runs again after a crash is never cancelled by a failure either: its first
    execution may have done its work, which only a recorded success gets undone.
    The caller's cancellation cancels every member (a sync one that has not started
    yet does not start; one running is awaited, as for a sequential step); a member
    cancelled before it started is recorded as failed with its `CancelledError`.

    Raises, once every member has settled: the driver's own failure (a store's),
    else the caller's cancellation (after cancelling the members as above).
    """
    limits = execution.limits
    if limits.steps and limits.past_deadline():
        _past_deadline(execution, decision)
        return
    # Members in flight at a crash run again from the latest recorded fields, not
    # those of their start: those would undo what the other members recorded since.
    members = [
        (action, execution.start_run(action.name, Role.STEP) if run is None else run)
        for action, run in decision.members
    ]
    try:
        await execution.commit_async()
    except asyncio.CancelledError as cancelled:  # the commit landed; nothing ran
        for _, run in members:
            execution.fail_run(run, cancelled)
        raise
    if execution.cancelled:  # cancel() was asked (the store refused the commit): none runs
        for _, run in members:
            execution.stop_cancelled(run)
        return
    tasks: dict[asyncio.Future[tuple[bool, object]], int] = {}
    cancelling: list[bool] = [not cancel_on_failure]  # set once the others are cancelled
    # What a failure cancels: async members that start now.
    cancellable = {
        run
        for (action, run), (_, given) in zip(members, decision.members, strict=True)
        if action.is_async and given is None
    }

    def failed() -> None:
        if not cancelling[0]:
            cancelling[0] = True
            current = asyncio.current_task()
            for task, run in tasks.items():
                if task is not current and run in cancellable:
                    task.cancel()

    for action, run in members:
        governed = limits.steps and (
            limits.deadline_at is not None or limits.policy(action.name) is not None
        )
        # Captured: a member's runner never raises into the loop (a KeyboardInterrupt
        # escaping a task would stop the loop itself).
        member = _member(execution, action, run, governed=governed, failed=failed)
        tasks[asyncio.ensure_future(captured(member))] = run
    interrupted: asyncio.CancelledError | None = None
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait([task for task in tasks if not task.done()])
        except asyncio.CancelledError as error:
            interrupted = error  # the caller's: every member is cancelled, and settles
            for task in tasks:
                task.cancel()
    driver_error = _settled(execution, tasks)
    if driver_error is not None:
        raise driver_error
    if interrupted is not None:
        raise interrupted
    # Outcomes of members cancelled before they started, if any.
    await execution.commit_async()


def _past_deadline(execution: Execution, decision: RunGroup) -> None:
    """The deadline passed before the group could start: its members in flight at a
    crash fail with `DeadlineExceeded` (the engine then starts the rollback); if none
    was, none starts and the rollback does."""
    deadline = execution.limits.deadline
    assert deadline is not None
    error = DeadlineExceeded(decision.members[0][0].name, deadline)
    in_flight = [run for _, run in decision.members if run is not None]
    for run in in_flight:
        execution.fail_run(run, error)
    if not in_flight:
        execution.append(RollbackStarted(error))


def _settled(
    execution: Execution, tasks: dict[asyncio.Future[tuple[bool, object]], int]
) -> BaseException | None:
    """Once every member's task is done: record a failure for a member cancelled before
    it ran; return the first failure of the driver itself (a store's), if any."""
    driver_error: BaseException | None = None
    for task, run in tasks.items():
        if task.cancelled():  # cancelled before it started: it never ran
            try:
                task.result()
            except asyncio.CancelledError as never_ran:
                execution.fail_run(run, never_ran)
            continue
        succeeded, value = task.result()
        if isinstance(value, asyncio.CancelledError):
            execution.fail_run(run, value)  # dropped if the run has its outcome already
        elif not succeeded and driver_error is None:
            driver_error = cast(BaseException, value)
    return driver_error


async def _member(
    execution: Execution, action: Action, run: int, *, governed: bool, failed: Callable[[], None]
) -> None:
    """One member of a group: run it, record its outcome, commit it. Raises only the
    driver's own failure (a store's)."""
    if governed:
        try:
            await attempt_async(execution, action, run, execution.limits, restore=False)
        except asyncio.CancelledError as cancelled:
            execution.fail_run(run, cancelled)
    else:
        ctx = Context(execution, action, run)
        try:
            result = await execution.invoke_async(action, ctx, abandonable=False)
        except BaseException as error:  # a cancellation too: recorded as a failure
            execution.fail_run(run, error)
        else:
            execution.finish_run(run, result)
        finally:
            ctx._closed = True
    if execution.engine.step_error is not None:
        failed()
    # A cancellation meanwhile came after the outcome: the commit landed (it is
    # waited for), and the outcome stands.
    with contextlib.suppress(asyncio.CancelledError):
        await execution.commit_async()
