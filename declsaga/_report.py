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
    journal = tuple(records)
    first: SagaStarted | None = None
    for record in journal:
        if type(record) is SagaStarted:
            first = record
    if first is None:
        raise ValueError("A journal without SagaStarted has no report.")
    runtime = timedelta(seconds=end_at - first.at)
    return Report(
        start=first.wall,
        end=first.wall + runtime,
        runtime=runtime,
        runs=_runs(journal, first.wall, first.at),
        error=error,
    )


def _runs(journal: tuple[Record, ...], wall: datetime, anchor: float) -> tuple[ActionRun, ...]:
    """The runs of a journal that finished, in completion order."""
    started: dict[int, RunStarted] = {}
    finished: list[RunSucceeded | RunFailed] = []
    compensations = False
    for record in journal:  # exact types: records are never subclassed
        if type(record) is RunStarted:
            started[record.run] = record
            if record.role is Role.COMPENSATION:
                compensations = True
        elif type(record) is RunSucceeded or type(record) is RunFailed:
            finished.append(record)

    # start = wall + (begin - anchor), and end = start + runtime so that
    # end - start == runtime exactly.
    def action_run(run: RunStarted, outcome: RunSucceeded | RunFailed) -> ActionRun:
        start = wall + timedelta(seconds=run.at - anchor)
        runtime = timedelta(seconds=outcome.at - run.at)
        failure = outcome.error if type(outcome) is RunFailed else None
        return ActionRun(
            run.action, start, start + runtime, runtime, failure, undone_by.get(run.run)
        )

    # A compensation finishes after the run it undoes, so build compensations first.
    undone_by: dict[int, ActionRun] = {}
    built: dict[int, ActionRun] = {}
    if compensations:
        for outcome in finished:
            run = started[outcome.run]
            if run.role is Role.COMPENSATION:
                built[outcome.run] = action_run(run, outcome)
                if type(outcome) is RunSucceeded and run.target is not None:
                    undone_by[run.target] = built[outcome.run]
    return tuple(
        built.get(outcome.run) or action_run(started[outcome.run], outcome) for outcome in finished
    )
