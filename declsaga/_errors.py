"""The error hierarchy: one base, each error also a matching builtin, all picklable."""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "ActionNotFound",
    "AggregateNotFound",
    "CancelRequested",
    "CompensationFailed",
    "CompensationTimeout",
    "DeadlineExceeded",
    "DefinitionError",
    "EmptyActionName",
    "EncodeError",
    "HandlerNotFound",
    "InvalidSetup",
    "LeaseLost",
    "MissingBus",
    "MissingRepository",
    "RecordedError",
    "SagaBusy",
    "SagaCancelled",
    "SagaError",
    "StepTimeout",
    "StoreError",
    "UsageError",
    "describe",
]


def describe(value: object) -> str:
    """A short description of a value for messages: its type and repr, shortened."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__qualname__})"


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself if it pickles, else a SagaError that keeps its type and message."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
    except Exception:
        return SagaError(f"{type(error).__module__}.{type(error).__qualname__}: {error}")
    return error


def _rebuild(
    cls: type[SagaError], args: tuple[Any, ...], state: dict[str, Any], cause: BaseException | None
) -> SagaError:
    # Bypass __init__: the fields are restored from state, and TimeoutError subclasses
    # would otherwise reinterpret args like OSError does.
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    error.__cause__ = cause
    return error


class SagaError(Exception):
    """Base of every declsaga error."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = {
            key: _portable(value) if isinstance(value, BaseException) else value
            for key, value in self.__dict__.items()
        }
        return (_rebuild, (type(self), self.args, state, _portable(self.__cause__)))


class UsageError(SagaError, TypeError):
    """An API was given an argument of the wrong kind."""


class InvalidSetup(SagaError, ValueError):
    """Base of the setup problems found by `validate`."""


class EmptyActionName(InvalidSetup):
    """A name in the sequence is empty or whitespace."""

    def __init__(self, name: str, *, position: int) -> None:
        self.name = name
        self.position = position
        super().__init__(
            f"The action name at position {position} of the sequence is empty: {name!r}."
        )


class ActionNotFound(InvalidSetup, LookupError):
    """A name does not resolve to an action of the setup."""

    def __init__(self, name: str, *, role: str) -> None:
        self.name = name
        self.role = role
        super().__init__(f"No action named {name!r} ({role}).")


class DefinitionError(InvalidSetup, TypeError):
    """A `Saga` subclass is malformed; raised when the class statement runs."""


class CompensationTimeout(SagaError, TimeoutError):
    """The rollback ran out of its `compensate_timeout` budget."""

    def __init__(self, action: str, compensator: str, timeout: float) -> None:
        self.action = action
        self.compensator = compensator
        self.timeout = timeout
        super().__init__(
            f"The rollback ran out of its {timeout:g}s budget while compensating "
            f"action {action!r} with {compensator!r}."
        )


class StepTimeout(SagaError, TimeoutError):
    """An action ran past its `timeout`: an async one was cancelled, a sync one abandoned
    (Python cannot stop a thread: it runs on, and its late outcome is discarded)."""

    def __init__(self, action: str, timeout: float) -> None:
        self.action = action
        self.timeout = timeout
        super().__init__(f"Action {action!r} did not finish within its timeout of {timeout:g}s.")


class DeadlineExceeded(SagaError, TimeoutError):
    """The saga's deadline passed: forward progress stopped and the rollback started."""

    def __init__(self, action: str, deadline: float) -> None:
        self.action = action
        self.deadline = deadline
        super().__init__(
            f"The saga's deadline of {deadline:g}s passed at action {action!r}; it rolls back."
        )


class CompensationFailed(SagaError):
    """The rollback failed: `.action_error` started it, `.error` stopped it."""

    def __init__(self, action_error: BaseException, error: BaseException) -> None:
        self.action_error = action_error
        self.error = error
        super().__init__(
            f"The rollback after {type(action_error).__name__}({action_error}) failed with "
            f"{type(error).__name__}({error})."
        )
        self.__cause__ = error


class MissingBus(SagaError):
    """An action published or dispatched without the bus configured."""

    def __init__(self, kind: str, action: str) -> None:
        self.kind = kind
        self.action = action
        super().__init__(
            f"Action {action!r} used the {kind} bus, but the executor has none: "
            f"pass {kind}_bus= to Executor."
        )


class MissingRepository(SagaError):
    """An action fetched an aggregate without a repository configured."""

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(
            f"Action {action!r} fetched an aggregate, but the executor has no repository: "
            "pass repository= to Executor."
        )


class HandlerNotFound(SagaError, LookupError):
    """A command was dispatched that no handler handles."""

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__(f"No handler is registered for command {command!r}.")


class AggregateNotFound(SagaError, LookupError):
    """The repository holds no aggregate of that type and id."""

    def __init__(self, aggregate_type: str, aggregate_id: object) -> None:
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        super().__init__(f"No {aggregate_type} aggregate with id {aggregate_id!r} is stored.")


class StoreError(SagaError):
    """The store failed or refused a file; the driver's error is the `__cause__`."""


class LeaseLost(StoreError):
    """The store no longer grants this process the saga: its lease expired (the process
    was paused or cut off) and another process may have taken the saga over. Nothing
    of the refused commit was written; the execution stops as after a crash."""


class Abandoned(StoreError):
    """A worker stopped driving a saga at a step boundary (it is shutting down): the
    saga stays unfinished, its journal complete so far, for another worker. Internal:
    raised through the same path as a store failure, which stops an execution the same
    way, and caught by the worker."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(
            f"Saga {saga_id!r} was left at a step boundary by a worker that is stopping; "
            "another worker resumes it."
        )


class CancelRequested(StoreError):
    """A store refused a commit that would carry a saga forward after `cancel()` was
    asked of it; nothing was written. The execution rolls the saga back instead."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"Saga {saga_id!r} was asked to cancel; it must roll back.")


class SagaCancelled(SagaError):
    """The saga was cancelled by an operator: it stopped at its next transition and
    rolled back."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"Saga {saga_id!r} was cancelled.")


class Parked(StoreError):
    """A worker parked a saga until its next attempt is due: committed, its claim let
    go, for any worker to take up then. Internal, like `Abandoned`."""

    def __init__(self, saga_id: str, due: float) -> None:
        self.saga_id = saga_id
        self.due = due
        super().__init__(f"Saga {saga_id!r} is parked until its next attempt is due.")


class SagaBusy(SagaError):
    """Another live process (or thread) drives this saga."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        super().__init__(f"Saga {saga_id!r} is being driven by another live process or thread.")


class RecordedError(SagaError):
    """A recorded error whose own class could not be rebuilt."""

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}")


STORABLE = (
    "str, int, float, bool, None, list, tuple, dict, datetime, date, UUID, Decimal, Enum "
    "and attrs instances"
)


class EncodeError(SagaError, TypeError):
    """A field or result that the journal's codec cannot store."""

    def __init__(self, what: str, action: str | None, type_name: str, detail: str = "") -> None:
        self.what = what
        self.action = action  # None: the saga's initial fields, before any action ran
        self.type_name = type_name
        self.detail = detail
        subject = (
            f"Action {action!r} left {what} holding"
            if action
            else f"The saga's initial {what} holds"
        )
        super().__init__(
            f"{subject} a {type_name}, which the journal cannot store"
            f"{f' ({detail})' if detail else ''}. It stores {STORABLE}."
        )
