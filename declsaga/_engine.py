"""The engine: goes' rollback rules as a pure function of a journal and a setup.

No I/O, no asyncio, no clock. Drivers append records with `apply` and ask `next()` what
happens next; recovering a saga is replaying its journal through `apply`.

A setup with parallel step groups gets a `GroupEngine` (see `engine_for`): several step
runs may then be open at once. A setup without groups gets the plain `Engine`, whose
per-step path knows nothing of groups.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._errors import ActionNotFound, CompensationFailed
from ._journal import (
    AttemptFailed,
    Record,
    Role,
    RollbackRetried,
    RollbackStarted,
    RunFailed,
    RunStarted,
    RunSucceeded,
    SagaEnded,
    SagaStarted,
    Status,
)
from ._setup import Action, Setup, group_spans

__all__ = [
    "Compensate",
    "Decision",
    "Engine",
    "Finish",
    "GroupEngine",
    "RunGroup",
    "RunStep",
    "StartRollback",
    "engine_for",
]


class RunStep(NamedTuple):
    """Run the next name of the sequence (`run` set: execute that started run again)."""

    action: Action
    run: int | None


class RunGroup(NamedTuple):
    """Run the members of a parallel group together, each `(action, run)`: `run` is None
    for a member to start, set for a member in flight at a crash (to execute again);
    members with an outcome are not listed."""

    members: tuple[tuple[Action, int | None], ...]


class StartRollback(NamedTuple):
    """A step failed (or did not resolve): record the rollback's start."""

    error: BaseException


class Compensate(NamedTuple):
    """Undo the succeeded run `target` (of action `target_action`) with `action`."""

    action: Action
    target: int
    target_action: str
    run: int | None


class Finish(NamedTuple):
    """The saga is over: record its end; `error` is what the execution raises."""

    status: Status
    error: BaseException | None


Decision = RunStep | RunGroup | StartRollback | Compensate | Finish

# A NamedTuple's constructor is a Python function; the step decision is made on every
# step, so it is built from a tuple directly.
_new_tuple: Any = tuple.__new__


class Engine:
    """The state that the rollback rules need, folded from the journal's records."""

    __slots__ = (
        "_compensation_error",
        "_ended",
        "_failed_target",
        "_next_step",
        "_open_compensation",
        "_open_step",
        "_position",
        "_rollback_error",
        "_rollback_pos",
        "_runs",
        "_sequence",
        "_setup",
        "_step_error",
        "_succeeded",
    )

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._sequence = tuple(setup.sequence())
        self._next_step = 0
        self._runs: dict[int, RunStarted] = {}
        self._open_step: int | None = None
        self._step_error: BaseException | None = None
        # Runs that can be compensated, in completion order, and each one's position there.
        self._succeeded: list[int] = []
        self._position: dict[int, int] = {}
        self._rollback_error: BaseException | None = None
        self._rollback_pos = -1  # the next candidate for compensation, scanning downwards
        self._open_compensation: int | None = None
        self._compensation_error: BaseException | None = None
        self._failed_target: int | None = None  # the run a failed compensation undid
        self._ended: Finish | None = None

    @property
    def status(self) -> Status:
        if self._ended is not None:
            return self._ended.status
        return Status.RUNNING if self._rollback_error is None else Status.COMPENSATING

    @property
    def step_error(self) -> BaseException | None:
        """The error of the step that failed (of a group: the first), until the rollback
        starts."""
        return self._step_error

    def action_of(self, run: int) -> str:
        return self._runs[run].action

    def apply(self, record: Record) -> None:
        """Fold one record into the state."""
        if type(record) is RunStarted:
            self.run_started(record)
        elif type(record) is RunSucceeded:
            self.run_succeeded(record)
        elif type(record) is RunFailed:
            self.run_failed(record)
        elif type(record) is RollbackStarted:
            self._rollback_error = record.error
            self._step_error = None
            self._rollback_pos = len(self._succeeded) - 1
        elif type(record) is SagaEnded:
            self._ended = Finish(record.status, record.error)
        elif type(record) is RollbackRetried:
            # The failed saga's rollback goes on, from the compensation that failed.
            assert self._failed_target is not None
            self._ended = None
            self._compensation_error = None
            self._rollback_pos = self._position[self._failed_target]
        elif type(record) is not SagaStarted and type(record) is not AttemptFailed:
            # An attempt that failed leaves its run open: the rules do not change.
            raise TypeError(f"Unknown journal record {record!r}.")

    # The three run transitions, also called directly by drivers that know the record's
    # type: `apply` is the general entry point.

    def run_started(self, record: RunStarted) -> None:
        self._runs[record.run] = record
        if record.role is Role.STEP:
            self._next_step += 1
            self._open_step = record.run
        elif record.role is Role.COMPENSATION:
            self._open_compensation = record.run
            assert record.target is not None
            self._rollback_pos = self._position[record.target] - 1

    def run_succeeded(self, record: RunSucceeded) -> None:
        role = self._runs[record.run].role
        if role is Role.COMPENSATION:
            self._open_compensation = None
            return
        if role is Role.STEP:
            self._open_step = None
        # Compensators are never compensated; calls made during the rollback land after
        # `_rollback_pos`, so the rollback never reaches them either.
        self._position[record.run] = len(self._succeeded)
        self._succeeded.append(record.run)

    def run_failed(self, record: RunFailed) -> None:
        role = self._runs[record.run].role
        if role is Role.STEP:
            self._open_step = None
            self._step_error = record.error
        elif role is Role.COMPENSATION:
            self._open_compensation = None
            self._compensation_error = record.error
            self._failed_target = self._runs[record.run].target

    def next(self) -> Decision:
        """What happens next; asking twice without applying anything gives the same answer."""
        if self._ended is not None:
            return self._ended
        if self._rollback_error is not None:
            return self._rollback(self._rollback_error)
        # Forward (asked once per step, so not a method of its own).
        if self._step_error is not None:
            return StartRollback(self._step_error)
        setup = self._setup
        if self._open_step is not None:
            started = self._runs[self._open_step]
            action = setup.action(started.action)
            if action is None:
                return StartRollback(ActionNotFound(started.action, role="in the sequence"))
            return RunStep(action, self._open_step)
        if self._next_step < len(self._sequence):
            name = self._sequence[self._next_step]
            action = setup.action(name)
            if action is None:
                return StartRollback(ActionNotFound(name, role="in the sequence"))
            step: RunStep = _new_tuple(RunStep, (action, None))
            return step
        return Finish(Status.COMPLETED, None)

    def _rollback(self, action_error: BaseException) -> Decision:
        if self._compensation_error is not None:
            return Finish(Status.FAILED, CompensationFailed(action_error, self._compensation_error))
        setup = self._setup
        if self._open_compensation is not None:
            started = self._runs[self._open_compensation]
            assert started.target is not None
            return self._compensate(action_error, started.target, self._open_compensation)
        for pos in range(self._rollback_pos, -1, -1):
            target = self._succeeded[pos]
            if setup.compensator(self._runs[target].action):
                return self._compensate(action_error, target, None)
        return Finish(Status.COMPENSATED, action_error)

    def _compensate(self, action_error: BaseException, target: int, run: int | None) -> Decision:
        target_action = self._runs[target].action
        compensator = self._setup.compensator(target_action)
        action = self._setup.action(compensator) if compensator else None
        if action is None:
            missing = ActionNotFound(
                compensator or "", role=f"the compensator of {target_action!r}"
            )
            return Finish(Status.FAILED, CompensationFailed(action_error, missing))
        return Compensate(action, target, target_action, run)


def engine_for(setup: Setup) -> Engine:
    """The engine for `setup`: a `GroupEngine` if it has parallel groups (which a setup
    exposes with `_declsaga_groups()`, beyond the Setup protocol), else an `Engine`."""
    groups_of = getattr(setup, "_declsaga_groups", None)
    groups = groups_of() if groups_of is not None else None
    if not groups:
        return Engine(setup)
    return GroupEngine(setup, group_spans(setup.sequence(), groups))


class GroupEngine(Engine):
    """The rules with parallel groups: a group's members start together, and their
    outcomes come in any order (completion order). Once every member has an outcome the
    group is settled: if one failed, the rollback starts with the FIRST failure recorded,
    and compensates every succeeded run, group members included, newest first; else the
    sequence goes on after the group."""

    __slots__ = ("_group_end", "_open_members", "_spans")

    def __init__(self, setup: Setup, spans: dict[int, int]) -> None:
        super().__init__(setup)
        self._spans = spans  # a group's first sequence position -> the one after its last
        self._group_end: int | None = None  # the group under way: the position after it
        self._open_members: dict[int, None] = {}  # its started runs without outcome, in order

    def run_started(self, record: RunStarted) -> None:
        if record.role is Role.STEP:
            end = self._group_end
            if end is None:
                end = self._spans.get(self._next_step)
            if end is not None and self._next_step < end:
                self._group_end = end
                self._runs[record.run] = record
                self._next_step += 1
                self._open_members[record.run] = None
                return
        super().run_started(record)

    def run_succeeded(self, record: RunSucceeded) -> None:
        super().run_succeeded(record)
        if record.run in self._open_members:
            self._settle(record.run)

    def run_failed(self, record: RunFailed) -> None:
        if record.run in self._open_members:
            if self._step_error is None:  # the first failure is the rollback's error
                self._step_error = record.error
            self._settle(record.run)
            return
        super().run_failed(record)

    def _settle(self, run: int) -> None:
        del self._open_members[run]
        end = self._group_end
        if not self._open_members and end is not None and self._next_step >= end:
            self._group_end = None  # every member has its outcome

    def next(self) -> Decision:
        if self._ended is None and self._rollback_error is None:
            end = self._group_end
            if end is not None:  # a group under way (resumed after a crash, say)
                return self._group(end)
            if (
                self._step_error is None
                and self._open_step is None
                and (end := self._spans.get(self._next_step)) is not None
            ):
                return self._group(end)
        return super().next()

    def _group(self, end: int) -> Decision:
        """The members of the group ending before `end` that still need to run."""
        setup = self._setup
        members: list[tuple[Action, int | None]] = []
        for run in self._open_members:
            name = self._runs[run].action
            action = setup.action(name)
            if action is None:
                return StartRollback(ActionNotFound(name, role="in the sequence"))
            members.append((action, run))
        for name in self._sequence[self._next_step : end]:
            action = setup.action(name)
            if action is None:
                return StartRollback(ActionNotFound(name, role="in the sequence"))
            members.append((action, None))
        return RunGroup(tuple(members))
