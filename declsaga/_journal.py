"""The journal: the append-only transitions that ARE a saga execution.

Records are plain named tuples: cheap to create on the hot path, immutable, and easy to
encode for a durable store. Times are monotonic clock readings taken by the drivers;
`SagaStarted` anchors them to the wall clock for the report.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import NamedTuple

__all__ = [
    "AttemptFailed",
    "Record",
    "Role",
    "RollbackRetried",
    "RollbackStarted",
    "RunFailed",
    "RunStarted",
    "RunSucceeded",
    "SagaEnded",
    "SagaStarted",
    "Status",
]


class Role(Enum):
    """Why a run happened."""

    STEP = "step"  # a name of the sequence
    CALL = "call"  # a nested `ctx.run` from another run
    COMPENSATION = "compensation"  # undoing a succeeded run during the rollback


class Status(Enum):
    """Where a saga stands; the last four are final."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    RESOLVED = "resolved"  # failed, then resolved by an operator


class SagaStarted(NamedTuple):
    saga_id: str
    wall: datetime  # aware UTC: the wall-clock time that `at` corresponds to
    at: float


class RunStarted(NamedTuple):
    run: int  # ids are 0, 1, 2... in start order
    action: str
    role: Role
    parent: int | None  # the calling run, for a CALL
    call_index: int | None  # the call's position among its parent's calls, for a CALL
    target: int | None  # the run being undone, for a COMPENSATION
    at: float


class RunSucceeded(NamedTuple):
    run: int
    result: object
    at: float


class RunFailed(NamedTuple):
    run: int
    error: BaseException
    at: float


class AttemptFailed(NamedTuple):
    """Attempt `attempt` of run `run` failed and its action's retry policy runs it again
    after `delay` seconds; the run stays open."""

    run: int
    attempt: int  # 1 for the first
    error: BaseException
    delay: float
    at: float


class RollbackStarted(NamedTuple):
    error: BaseException  # what the failing step raised


class RollbackRetried(NamedTuple):
    """An operator retries the rollback of a failed saga, from its failed compensation."""

    at: float


class SagaEnded(NamedTuple):
    status: Status
    error: BaseException | None  # what the execution raises; None after success
    at: float


Record = (
    SagaStarted
    | RunStarted
    | RunSucceeded
    | RunFailed
    | AttemptFailed
    | RollbackStarted
    | RollbackRetried
    | SagaEnded
)
