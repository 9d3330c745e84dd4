"""The journal in a store: records as JSON entries, commits, and the fields after each run.

`DurableLog` sits between an `Execution` and a `Store`. Records are encoded as they are
appended (an outcome that cannot be encoded becomes a failure with `EncodeError`) and
wait in `pending` until the execution commits them, which it does before it acts on
them: one commit per step, since a run's outcome rides with the next run's start.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from time import perf_counter
from typing import Any

import attrs

from ._codec import Undecodable, Unencodable, apply_fields, decode, encode, encode_fields
from ._dsl import Saga, compiled
from ._errors import CancelRequested, EncodeError, StoreError, UsageError, describe
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
from ._loops import off_loop
from ._recorded import decode_error, encode_error
from ._registry import Definition, lookup
from ._setup import FunctionalSetup, Setup
from .stores._base import JSON, Claim, Commit, SagaHeader, Store, StoredSaga

__all__ = ["DurableLog", "Frame", "Identity", "Replay", "identify"]


@attrs.frozen
class Identity:
    """Who a setup is to a store: its registered name and its definition's shape."""

    name: str
    definition: Definition
    saga_class: type[Saga] | None  # None for a named new() setup


def identify(setup: Setup) -> Identity:
    """The identity of a setup that a store can find again, or a UsageError."""
    if isinstance(setup, Saga):
        plan = compiled(type(setup))
        assert plan is not None  # every Saga subclass is compiled
        identity = Identity(plan.plan.name, plan.definition, type(setup))
        current: object = type(setup)
    elif isinstance(setup, FunctionalSetup) and setup.name is not None:
        identity = Identity(setup.name, setup.definition, None)
        current = setup
    else:
        raise UsageError(
            "A durable executor runs Saga instances and setups built with "
            f"new(..., name=...), so that recovery can find them again; got {describe(setup)}."
        )
    if lookup(identity.name) is not current:
        raise UsageError(
            f"{describe(setup)} is no longer the definition registered as "
            f"{identity.name!r}: a newer definition took that name."
        )
    return identity


@attrs.frozen
class Frame:
    """Converts between this process's monotonic clock and epoch seconds in entries."""

    epoch: float = attrs.field(factory=time.time)
    perf: float = attrs.field(factory=perf_counter)

    def to_epoch(self, at: float) -> float:
        return self.epoch + (at - self.perf)

    def to_perf(self, epoch: float) -> float:
        return self.perf + (epoch - self.epoch)


# Enum `.value` goes through a descriptor: these lookups are cheaper on the hot path.
_ROLE_VALUES = {role: role.value for role in Role}
_STATUS_VALUES = {status: status.value for status in Status}


def _entry(record: Record, frame: Frame) -> dict[str, JSON]:
    if type(record) is RunStarted:
        entry: dict[str, JSON] = {
            "kind": "run_started",
            "run": record.run,
            "action": record.action,
            "role": _ROLE_VALUES[record.role],
        }
        if record.parent is not None:
            entry["parent"] = record.parent
            entry["index"] = record.call_index
        if record.target is not None:
            entry["target"] = record.target
        entry["at"] = frame.to_epoch(record.at)
        return entry
    if type(record) is RunSucceeded:
        return {
            "kind": "run_succeeded",
            "run": record.run,
            "at": frame.to_epoch(record.at),
        }
    if type(record) is RunFailed:
        error = encode_error(record.error)
        return {
            "kind": "run_failed",
            "run": record.run,
            "error": error,
            "at": frame.to_epoch(record.at),
        }
    if type(record) is AttemptFailed:
        return {
            "kind": "attempt_failed",
            "run": record.run,
            "attempt": record.attempt,
            "error": encode_error(record.error),
            "delay": record.delay,
            "at": frame.to_epoch(record.at),
        }
    if type(record) is RollbackStarted:
        return {"kind": "rollback_started", "error": encode_error(record.error)}
    if type(record) is RollbackRetried:
        return {"kind": "rollback_retried", "at": frame.to_epoch(record.at)}
    if type(record) is SagaEnded:
        error = None if record.error is None else encode_error(record.error)
        return {
            "kind": "saga_ended",
            "status": _STATUS_VALUES[record.status],
            "error": error,
            "at": frame.to_epoch(record.at),
        }
    if type(record) is SagaStarted:
        return {"kind": "saga_started", "at": record.wall.timestamp()}
    raise TypeError(f"Unknown journal record {record!r}.")


def _record(entry: Any, frame: Frame, saga_id: str) -> Record:
    """The record an entry stands for; StoreError for an entry this version cannot read."""
    try:
        kind = entry["kind"]
        if kind == "run_started":
            return RunStarted(
                entry["run"],
                entry["action"],
                Role(entry["role"]),
                entry.get("parent"),
                entry.get("index"),
                entry.get("target"),
                frame.to_perf(entry["at"]),
            )
        if kind == "run_succeeded":
            return RunSucceeded(
                entry["run"], decode(entry.get("result")), frame.to_perf(entry["at"])
            )
        if kind == "run_failed":
            return RunFailed(entry["run"], decode_error(entry["error"]), frame.to_perf(entry["at"]))
        if kind == "attempt_failed":
            return AttemptFailed(
                entry["run"],
                entry["attempt"],
                decode_error(entry["error"]),
                entry["delay"],
                frame.to_perf(entry["at"]),
            )
        if kind == "rollback_started":
            return RollbackStarted(decode_error(entry["error"]))
        if kind == "rollback_retried":
            return RollbackRetried(frame.to_perf(entry["at"]))
        if kind == "saga_ended":
            error = entry.get("error")
            return SagaEnded(
                Status(entry["status"]),
                None if error is None else decode_error(error),
                frame.to_perf(entry["at"]),
            )
        if kind == "saga_started":
            at = entry["at"]
            return SagaStarted(saga_id, datetime.fromtimestamp(at, UTC), frame.to_perf(at))
    except (KeyError, TypeError, ValueError, Undecodable) as error:
        raise StoreError(
            f"Saga {saga_id!r} has a journal entry this version cannot read: {entry!r} ({error})."
        ) from error
    raise StoreError(f"Saga {saga_id!r} has a journal entry of an unknown kind: {entry!r}.")


@attrs.define
class Replay:
    """What a stored journal tells a resumed execution beyond its records."""

    records: list[Record]
    calls: dict[tuple[int, int], int]  # (parent run, call index) -> the recorded call
    fields_before: dict[int, JSON]  # run -> the fields in effect when it started
    fields_after: dict[int, JSON]  # run -> the fields recorded with its outcome
    outcomes: dict[int, RunSucceeded | RunFailed]
    fields: JSON  # the latest fields recorded


def replay(stored: StoredSaga, frame: Frame) -> Replay:
    """Decode a stored journal for resuming or reporting."""
    saga_id = stored.header.saga_id
    current = stored.header.fields
    result = Replay([], {}, {}, {}, {}, current)
    for entry in stored.entries:
        record = _record(entry, frame, saga_id)
        result.records.append(record)
        if type(record) is RunStarted:
            result.fields_before[record.run] = current
            if record.parent is not None and record.call_index is not None:
                result.calls[record.parent, record.call_index] = record.run
        elif type(record) is RunSucceeded or type(record) is RunFailed:
            current = entry.get("fields", current)
            result.fields_after[record.run] = current
            result.outcomes[record.run] = record
    result.fields = current
    return result


def _async_append(store: Store) -> Callable[[Claim, Commit], Awaitable[None]] | None:
    """The store's `append_async`: an optional capability beyond the Store protocol, an
    `append` to await from the event loop, which it must not block (see
    `SQLiteStore.append_async`). Like `off_loop(store.append, ...)`, it waits for the
    append to end even if the awaiting task is cancelled meanwhile, and raises the
    append's error if it failed, else the cancellation: a `CancelledError` from it means
    that the commit is durable.

    Used only if the class that defines the store's `append` defines it too: a subclass
    that overrides `append`, or a wrapper that passes unknown attributes through to
    another store (like `testing.CrashingStore`), must never be bypassed; nor an
    `append` set on the instance."""
    if "append" in getattr(store, "__dict__", ()):
        return None
    for cls in type(store).__mro__:
        if "append" in vars(cls):
            if "append_async" not in vars(cls):
                return None
            bound: Callable[[Claim, Commit], Awaitable[None]]
            bound = store.append_async  # type: ignore[attr-defined]  # checked just above
            return bound
    return None


class DurableLog:
    """Encodes records as they happen and commits them to the store when asked."""

    def __init__(
        self,
        store: Store,
        claim: Claim,
        setup: Setup,
        header: SagaHeader,
        *,
        seq: int,
        fields: JSON,
        status: Status | None,
        frame: Frame,
    ) -> None:
        self.store = store
        self.claim = claim
        self.name = header.name
        self.frame = frame
        self._saga = setup if isinstance(setup, Saga) else None
        self._header = header
        self._seq = seq
        self._fields = fields  # the last fields recorded
        self._status = status  # the last status committed
        self._pending: list[dict[str, JSON]] = []
        self._pending_lock = threading.Lock()  # records arrive from several threads
        self._commit_lock = threading.Lock()
        self._append_async = _async_append(store)
        self.broken: StoreError | None = None

    def add(self, record: Record) -> None:
        entry = _entry(record, self.frame)
        with self._pending_lock:
            self._pending.append(entry)

    def outcome(self, record: RunSucceeded | RunFailed, action: str) -> RunSucceeded | RunFailed:
        """Record a run's outcome with the fields after it; may turn it into a failure."""
        entry = _entry(record, self.frame)
        try:
            if type(record) is RunSucceeded and record.result is not None:
                entry["result"] = self._encode(record.result, "its result", action)
            if self._saga is not None:
                fields = self._encode_fields(action)
                if fields != self._fields:
                    entry["fields"] = self._fields = fields
        except EncodeError as error:
            # The run fails; the saga's fields go back to their last recorded value.
            if self._saga is not None:
                apply_fields(self._saga, self._fields)
            record = RunFailed(record.run, error, record.at)
            entry = _entry(record, self.frame)
        with self._pending_lock:
            self._pending.append(entry)
        return record

    def _encode(self, value: object, what: str, action: str) -> JSON:
        try:
            return encode(value)
        except Unencodable as error:
            raise EncodeError(
                f"{what}{error.path}", action, error.type_name, error.reason
            ) from None

    def _encode_fields(self, action: str) -> JSON:
        assert self._saga is not None
        try:
            return encode_fields(self._saga)
        except Unencodable as error:
            raise EncodeError(
                f"field {error.path}", action, error.type_name, error.reason
            ) from None

    def commit(self, status: Status, *, due: float | None = None) -> None:
        """Make everything recorded so far durable, in one store commit (`due`: parks
        the saga until then, see `Commit.due`).

        `CancelRequested` if the store refused it because the saga was cancelled: the
        records stay pending, for the commit that carries the rollback."""
        with self._commit_lock:
            commit = self._next_commit(status, due)
            if commit is None:
                return
            try:
                self.store.append(self.claim, commit)
            except Exception as error:
                self._not_landed(commit, error)
                raise
            self._landed(commit, status)

    async def commit_async(self, status: Status) -> None:
        """`commit` from the event loop, which it never blocks: through the store's
        optional `append_async` if it has one, else in a worker thread.

        Waited for to the end even if the caller is cancelled meanwhile; the cancellation
        then propagates."""
        append_async = self._append_async
        # The loop never waits for the lock: held by another thread, the commit waits
        # for it in a worker thread instead.
        if append_async is None or not self._commit_lock.acquire(blocking=False):
            await off_loop(self.commit, status)
            return
        try:
            commit = self._next_commit(status)
            if commit is None:
                return
            try:
                await append_async(self.claim, commit)
            except asyncio.CancelledError:
                # Raised only once the append succeeded (see SQLiteStore.append_async).
                self._landed(commit, status)
                raise
            except Exception as error:
                self._not_landed(commit, error)
                raise
            self._landed(commit, status)
        finally:
            self._commit_lock.release()

    def _not_landed(self, commit: Commit, error: Exception) -> None:
        """An append failed. Refused for a cancel, its entries go back in front of the
        pending, for the commit that carries the rollback; any other failure breaks the
        log (see `_broke`)."""
        if isinstance(error, CancelRequested):
            with self._pending_lock:
                self._pending = [*commit.entries, *self._pending]
            return
        self._broke(error)

    def _landed(self, commit: Commit, status: Status) -> None:
        self._seq = commit.seq + 1
        self._status = status

    def _broke(self, error: Exception) -> None:
        """Remember a failed append: every later commit raises it, so an execution stops
        at its next step boundary even if an action swallowed the error. A store's bug
        (not a StoreError) stops the saga like a crash too."""
        if isinstance(error, StoreError):
            self.broken = error
            return
        self.broken = StoreError(f"The store failed: {error!r}.")
        raise self.broken from error

    def _next_commit(self, status: Status, due: float | None = None) -> Commit | None:
        """The store commit of what was recorded since the last one; None if nothing
        changed. Call with the commit lock held."""
        if self.broken is not None:
            raise self.broken
        with self._pending_lock:
            pending = self._pending
            if not pending and status is self._status:
                return None
            self._pending = []
        seq = self._seq
        return Commit(
            seq,
            tuple(pending),
            None if status is self._status else _STATUS_VALUES[status],
            self._header if seq == 0 else None,
            due,
        )
