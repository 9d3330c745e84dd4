"""The drivers: they act on what the engine decides for one execution.

`forward_blocking` runs the sequence on the calling thread (`execute`), `forward_async`
from the event loop (`execute_async`); `rollback` compensates, newest first, within the
rollback's time budget; `finish` records the end. Steps with a policy or under a deadline
go through `_attempts`; parallel groups through `_parallel`.
"""

from __future__ import annotations

import asyncio
import math
from time import perf_counter
from typing import TYPE_CHECKING, cast

from ._attempts import Limits, attempt_async, attempt_blocking
from ._context import Context
from ._engine import Compensate, Finish, RunGroup, RunStep, StartRollback
from ._errors import CompensationTimeout, DeadlineExceeded
from ._journal import Role, RollbackStarted
from ._loops import captured, consume
from ._parallel import run_group
from ._policies import DEFAULT_COMPENSATOR_RETRY

if TYPE_CHECKING:
    from ._execution import Execution

__all__ = ["finish", "forward_async", "forward_blocking", "rollback"]


def forward_blocking(execution: Execution) -> None:
    """Run the sequence on the calling thread until it completes or a step fails."""
    while True:
        decision = execution.engine.next()
        if type(decision) is RunStep:
            if execution.stop_when is not None and execution.stop_when.is_set():
                raise execution.abandon()
            action = decision.action
            limits = execution.limits
            if limits.steps and (governed := _governed(execution, decision, limits)) is not False:
                if governed:
                    run = _step_run(execution, decision)
                    execution.commit()
                    if not execution.stop_cancelled(run):
                        attempt_blocking(execution, action, run, limits)
                continue
            run = _step_run(execution, decision)
            execution.commit()
            if execution.cancelled and execution.stop_cancelled(run):
                continue
            ctx = Context(execution, action, run)
            try:
                result = execution.invoke_blocking(action, ctx)
            except BaseException as error:
                execution.fail_run(run, error)
            else:
                execution.finish_run(run, result)
            ctx._closed = True
        elif type(decision) is StartRollback:
            execution.append(RollbackStarted(decision.error))
            return
        elif type(decision) is RunGroup:
            if execution.stop_when is not None and execution.stop_when.is_set():
                raise execution.abandon()
            try:
                # On the private loop: sync members in worker threads, async ones as
                # tasks; a failure stops none of them.
                execution.block_on(run_group(execution, decision, cancel_on_failure=False))
            except Exception:
                raise  # the driver's own failure (a store's): it stops like a crash
            except BaseException as interrupted:  # a KeyboardInterrupt, say
                # Every member has its outcome (run_group waited for them).
                execution.append(RollbackStarted(interrupted))
                return
        else:
            return


async def forward_async(execution: Execution) -> None:
    """Run the sequence from the loop until it completes, a step fails, or it is cancelled."""
    while True:
        decision = execution.engine.next()
        if type(decision) is RunStep:
            if execution.stop_when is not None and execution.stop_when.is_set():
                raise await execution.abandon_async()
            action = decision.action
            limits = execution.limits
            if limits.steps and (governed := _governed(execution, decision, limits)) is not False:
                if governed:
                    run = _step_run(execution, decision)
                    try:
                        await execution.commit_async()
                        if not execution.stop_cancelled(run):
                            await attempt_async(execution, action, run, limits)
                    except asyncio.CancelledError as cancelled:
                        execution.fail_run(run, cancelled)
                        execution.append(RollbackStarted(cancelled))
                        return
                continue
            run = _step_run(execution, decision)
            ctx = Context(execution, action, run)
            try:
                # Inside the try: a cancellation while committing cancels the step.
                await execution.commit_async()
                if execution.cancelled and execution.stop_cancelled(run):
                    continue
                result = await execution.invoke_async(action, ctx, abandonable=False)
            except asyncio.CancelledError as cancelled:
                # Recorded only if the run has no real outcome yet (see invoke_async).
                execution.fail_run(run, cancelled)
                execution.append(RollbackStarted(cancelled))
                return
            except BaseException as error:
                execution.fail_run(run, error)
            else:
                execution.finish_run(run, result)
            finally:
                ctx._closed = True
        elif type(decision) is StartRollback:
            execution.append(RollbackStarted(decision.error))
            return
        elif type(decision) is RunGroup:
            if execution.stop_when is not None and execution.stop_when.is_set():
                raise await execution.abandon_async()
            try:
                await run_group(execution, decision, cancel_on_failure=True)
            except asyncio.CancelledError as cancelled:
                # Every member has its outcome (run_group waited for them).
                execution.append(RollbackStarted(cancelled))
                return
        else:
            return


def _governed(execution: Execution, decision: RunStep, limits: Limits) -> bool | None:
    """Whether this step runs under a policy or the deadline (the long path); None
    if the deadline has passed: then the step does not start, the rollback does."""
    if limits.past_deadline():
        assert limits.deadline is not None
        error = DeadlineExceeded(decision.action.name, limits.deadline)
        if decision.run is None:
            execution.append(RollbackStarted(error))
        else:  # in flight at a crash: it fails, and the engine starts the rollback
            execution.fail_run(decision.run, error)
        return None
    return limits.deadline_at is not None or limits.policy(decision.action.name) is not None


def _step_run(execution: Execution, decision: RunStep) -> int:
    """The run of a step: a new one, or one that executes again after a crash (from
    the fields recorded when it first started)."""
    if decision.run is None:
        return execution.start_run(decision.action.name, Role.STEP)
    execution.restore_fields(decision.run)
    return decision.run


async def rollback(execution: Execution) -> None:
    """Compensate, newest first, within one time budget for all compensations."""
    budget = execution.compensate_timeout
    while True:
        decision = execution.engine.next()
        if type(decision) is not Compensate:
            return
        if execution.stop_when is not None and execution.stop_when.is_set():
            raise await execution.abandon_async()
        action = decision.action
        run = decision.run
        if budget <= 0:
            # Its turn came after the budget was spent: it does not start.
            at = perf_counter()
            if run is None:
                run = execution.start_run(
                    action.name, Role.COMPENSATION, target=decision.target, at=at
                )
            execution.fail_run(run, _budget_timeout(execution, decision), at=at)
            continue
        if run is None:
            run = execution.start_run(action.name, Role.COMPENSATION, target=decision.target)
        else:
            execution.restore_fields(run)
        await execution.commit_async()
        begin = perf_counter()
        contexts: list[Context] = []

        def budget_left(left: float = budget, begin: float = begin) -> float:
            return left - (perf_counter() - begin)

        # Captured: a KeyboardInterrupt or SystemExit would otherwise escape the
        # compensator's task and the event loop, leaving the saga unconcluded. Its
        # attempts record the outcome; the budget may cut them short.
        attempts = attempt_async(
            execution,
            action,
            run,
            execution.limits,
            default=DEFAULT_COMPENSATOR_RETRY,
            budget_left=budget_left,
            abandonable=True,
            contexts=contexts,
        )
        task = asyncio.ensure_future(captured(attempts))
        done, _ = await asyncio.wait({task}, timeout=None if math.isinf(budget) else budget)
        budget -= perf_counter() - begin
        if not done:
            if contexts:
                contexts[-1]._closed = True  # before the cancellation reaches it
            task.cancel()
            task.add_done_callback(consume)
            execution.fail_run(run, _budget_timeout(execution, decision))
            continue
        succeeded, value = task.result()
        if not succeeded:  # a failure of the driver itself (a store's, say)
            raise cast(BaseException, value)


def _budget_timeout(execution: Execution, decision: Compensate) -> CompensationTimeout:
    return CompensationTimeout(
        decision.target_action, decision.action.name, execution.compensate_timeout
    )


def finish(execution: Execution) -> Finish:
    """Record the end the engine decides, and return it."""
    decision = execution.engine.next()
    assert type(decision) is Finish, decision
    execution.seal(decision)
    return decision
