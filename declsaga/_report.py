"""`Report` and `ActionRun`: a view of a finished journal."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import attrs

from ._journal import Record, Role, RunFailed, RunStarted, RunSucceeded, SagaStarted

__all__ = ["ActionRun", "Recovered", "Report", "build_report"]


@attrs.frozen(eq=False)
class ActionRun:
    """One run of an action: a step, a nested call, or a compensation."""

    action: str
    start: datetime
    end: datetime
    runtime: timedelta
    error: BaseException | None = None
    compensated_by: ActionRun | None = None


@attrs.frozen(eq=False)
class Report:
    """The outcome of one execution: every run in completion order, and the error raised."""

    start: datetime
    end: datetime
    runtime: timedelta
    runs: tuple[ActionRun, ...]
    error: BaseException | None

    @property
    def succeeded(self) -> tuple[ActionRun, ...]:
        return tuple(run for run in self.runs if run.error is None)

    @property
    def failed(self) -> tuple[ActionRun, ...]:
        return tuple(run for run in self.runs if run.error is not None)

    @property
    def compensated(self) -> tuple[ActionRun, ...]:
        return tuple(
            run for run in self.runs if run.error is None and run.compensated_by is not None
        )


@attrs.frozen(eq=False)
class Recovered:
    """What `recover()` did with one unfinished saga: finished it, or refused to."""

    saga_id: str
    name: str  # the registered name of its definition
    status: str  # its status now: completed, compensated, failed, or unchanged if refused
    report: Report | None  # None when refused
    error: BaseException | None  # what executing it raised, as `execute` would have
    refused: str | None = None  # why it was left untouched


def build_report(records: Iterable[Record], error: BaseException | None, end_at: float) -> Report:
    """Build the report of a journal; runs that never finished are left out."""
    started: dict[int, RunStarted] = {}
    finished: list[RunSucceeded | RunFailed] = []
    clock: _Clock | None = None
    for record in records:
        match record:
            case RunStarted():
                started[record.run] = record
            case RunSucceeded() | RunFailed():
                finished.append(record)
            case SagaStarted():
                clock = _Clock(record.wall, record.at)
    if clock is None:
        raise ValueError("A journal without SagaStarted has no report.")

    # A compensation finishes after the run it undoes, so build compensations first.
    undone_by: dict[int, ActionRun] = {}
    built: dict[int, ActionRun] = {}
    for outcome in finished:
        run = started[outcome.run]
        if run.role is Role.COMPENSATION:
            built[outcome.run] = clock.action_run(run, outcome, None)
            if type(outcome) is RunSucceeded and run.target is not None:
                undone_by[run.target] = built[outcome.run]
    runs = tuple(
        built.get(outcome.run)
        or clock.action_run(started[outcome.run], outcome, undone_by.get(outcome.run))
        for outcome in finished
    )
    start, end, runtime = clock.span(clock.anchor, end_at)
    return Report(start=start, end=end, runtime=runtime, runs=runs, error=error)


@attrs.frozen
class _Clock:
    """Turns monotonic readings into wall-clock times, all offsets from one anchor."""

    wall: datetime
    anchor: float

    def span(self, begin: float, end: float) -> tuple[datetime, datetime, timedelta]:
        # end is computed as start + runtime so that end - start == runtime exactly.
        start = self.wall + timedelta(seconds=begin - self.anchor)
        runtime = timedelta(seconds=end - begin)
        return start, start + runtime, runtime

    def action_run(
        self, run: RunStarted, outcome: RunSucceeded | RunFailed, undone_by: ActionRun | None
    ) -> ActionRun:
        start, end, runtime = self.span(run.at, outcome.at)
        error = outcome.error if isinstance(outcome, RunFailed) else None
        return ActionRun(run.action, start, end, runtime, error, undone_by)
