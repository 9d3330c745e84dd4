"""`Executor`: runs setups with goes' semantics; blocking and asyncio entry points."""

from __future__ import annotations

import asyncio
import math
import uuid
from asyncio import events
from collections.abc import Callable
from datetime import timedelta
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from ._errors import CompensationFailed, SagaError, UsageError, describe
from ._execution import Execution
from ._journal import Status
from ._report import Report, build_report
from ._setup import Setup, check_setup, validate

if TYPE_CHECKING:
    from ._components import AggregateRepository, CommandBus, EventBus
    from ._engine import Finish

__all__ = ["DEFAULT_COMPENSATE_TIMEOUT", "Executor", "execute"]

DEFAULT_COMPENSATE_TIMEOUT: Final = 10.0

Reporter = Callable[[Report], object]


def _seconds(timeout: object) -> float:
    """`compensate_timeout` as seconds: a positive number, inf, or a positive timedelta."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        seconds = math.nan
    if not seconds > 0:  # also catches NaN
        raise ValueError(
            "compensate_timeout must be a number of seconds > 0, math.inf, or a positive "
            f"timedelta, got {describe(timeout)}."
        )
    return seconds


class Executor:
    """Runs setups. Holds configuration only, so one executor may run many sagas at once."""

    __slots__ = (
        "_command_bus",
        "_compensate_timeout",
        "_event_bus",
        "_reporter",
        "_repository",
        "_skip_validation",
    )

    def __init__(
        self,
        *,
        repository: AggregateRepository | None = None,
        event_bus: EventBus | None = None,
        command_bus: CommandBus | None = None,
        reporter: Reporter | None = None,
        compensate_timeout: float | timedelta = DEFAULT_COMPENSATE_TIMEOUT,
        skip_validation: bool = False,
    ) -> None:
        if reporter is not None and not callable(reporter):
            raise UsageError(
                f"reporter must be a callable taking a Report, got {describe(reporter)}."
            )
        self._repository = repository
        self._event_bus = event_bus
        self._command_bus = command_bus
        self._reporter = reporter
        self._compensate_timeout = _seconds(compensate_timeout)
        self._skip_validation = bool(skip_validation)

    def __repr__(self) -> str:
        return f"<Executor compensate_timeout={self._compensate_timeout:g}s>"

    def _prepare(
        self, setup: object, saga_id: str | None, api: str, loop: asyncio.AbstractEventLoop | None
    ) -> Execution:
        checked = check_setup(setup, api)
        if saga_id is None:
            saga_id = str(uuid.uuid4())
        elif not isinstance(saga_id, str) or not saga_id.strip():
            raise UsageError(f"saga_id must be a non-empty string, got {describe(saga_id)}.")
        if not self._skip_validation:
            validate(checked)
        return Execution(
            checked,
            saga_id,
            repository=self._repository,
            event_bus=self._event_bus,
            command_bus=self._command_bus,
            compensate_timeout=self._compensate_timeout,
            loop=loop,
        )

    def execute(self, setup: Setup, *, saga_id: str | None = None) -> Report:
        """Run `setup` to its end on the calling thread; return the report or raise."""
        if events._get_running_loop() is not None:
            raise SagaError(
                "execute() blocks, but it was called from a running event loop: "
                "use 'await executor.execute_async(...)' instead."
            )
        execution = self._prepare(setup, saga_id, "execute", None)
        try:
            execution.forward_blocking()
            if execution.engine.status is Status.COMPENSATING:
                # Sync compensators run in worker threads so the budget can abandon them.
                execution.block_on(execution.rollback())
        finally:
            execution.close_private_loop()
        return self._conclude(execution, None)

    async def execute_async(self, setup: Setup, *, saga_id: str | None = None) -> Report:
        """Run `setup` to its end from asyncio code; return the report or raise."""
        execution = self._prepare(setup, saga_id, "execute_async", asyncio.get_running_loop())
        await execution.forward_async()
        late_cancel = None
        if execution.engine.status is Status.COMPENSATING:
            late_cancel = await _shielded(execution.rollback())
        return self._conclude(execution, late_cancel)

    def _conclude(self, execution: Execution, late_cancel: asyncio.CancelledError | None) -> Report:
        """Seal the journal, report once, and return or raise the outcome."""
        decision = execution.finish()
        raised = _outcome_error(decision, late_cancel)
        report = build_report(execution.records, raised, perf_counter())
        if self._reporter is not None:
            try:
                self._reporter(report)
            except BaseException as reporter_error:
                if isinstance(raised, asyncio.CancelledError):
                    # The cancellation must win; the reporter's error becomes its context.
                    raise raised  # noqa: B904
                reporter_error.__context__ = raised
                raise
        if raised is not None:
            raise raised
        return report


def _outcome_error(
    decision: Finish, late_cancel: asyncio.CancelledError | None
) -> BaseException | None:
    """What the execution raises: the action's own error, or the rollback's failure."""
    error = decision.error
    if late_cancel is not None:
        # Cancelled during the rollback: the rollback finished, the cancellation stands.
        if isinstance(error, CompensationFailed):
            late_cancel.__cause__ = error
        return late_cancel
    if isinstance(error, CompensationFailed) and not isinstance(error.action_error, Exception):
        # A cancellation or KeyboardInterrupt must keep propagating as itself.
        error.action_error.__cause__ = error
        return error.action_error
    return error


async def _shielded(rollback: Any) -> asyncio.CancelledError | None:
    """Run the rollback to its end even if the caller is cancelled meanwhile; return the
    last cancellation received, if any."""
    task = asyncio.ensure_future(rollback)
    cancelled = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:
            # Also when the rollback has just finished: the cancellation arrived before
            # this task woke up. It stands, after the saga is concluded and reported.
            cancelled = error
    task.result()  # the rollback task itself is only cancelled when the loop shuts down
    return cancelled


def execute(setup: Setup, *, saga_id: str | None = None, **executor_options: Any) -> Report:
    """`Executor(**executor_options).execute(setup, saga_id=saga_id)`."""
    return Executor(**executor_options).execute(setup, saga_id=saga_id)
