"""The store contract: what a durable store persists, and nothing the engine can derive.

A store keeps, per saga, a header (its definition's name and fingerprint, its initial
fields) written once, a status, and a journal: an ordered list of commits, each a list
of JSON entries. Encoding entries (the codec) is not the store's business: entries
arrive as JSON-compatible values and come back equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import attrs

if TYPE_CHECKING:
    from declsaga._reading import SagaRecord

__all__ = [
    "FINAL_STATUSES",
    "JSON",
    "PENDING",
    "STATUSES",
    "UNCANCELLED",
    "Claim",
    "Commit",
    "Reading",
    "SagaHeader",
    "Store",
    "StoredSaga",
]

# A JSON-compatible value: dict, list, str, int, float, bool or None, nested.
JSON = Any

# "pending": submitted (its header and initial fields stored) and not started yet.
# "resolved": failed, then marked resolved by an operator.
STATUSES = (
    "pending",
    "running",
    "compensating",
    "completed",
    "compensated",
    "failed",
    "resolved",
)
PENDING = "pending"
FINAL_STATUSES = frozenset({"completed", "compensated", "failed", "resolved"})
# The statuses a commit may set after cancel() was asked: the rollback's, and the end of
# a saga whose last step had finished (too late to cancel).
UNCANCELLED = frozenset({"compensating", "compensated", "failed", "completed"})


@attrs.frozen
class SagaHeader:
    """What identifies a stored saga; written with its first commit, never changed."""

    saga_id: str
    name: str  # the registered name of its definition
    fingerprint: str  # of the definition: sequence, compensators, action names
    definition: JSON  # what the fingerprint was computed from, to explain a mismatch
    fields: JSON  # the initial fields, encoded (None for a setup without fields)


@attrs.frozen
class Commit:
    """One atomic append: journal entries, and the saga's new status if it changes."""

    seq: int  # 0 for the first commit of a saga, then 1, 2, ...: a gap or repeat fails
    entries: tuple[JSON, ...]
    status: str | None = None
    header: SagaHeader | None = None  # required with seq 0, which creates the saga
    # Parks the saga: `claim_next` passes it over until this time (epoch seconds).
    due: float | None = None


@attrs.frozen
class StoredSaga:
    """A saga as loaded from a store."""

    header: SagaHeader
    status: str
    entries: tuple[JSON, ...]  # every entry of every commit, in order
    seq: int  # the number of commits so far: the seq of the next one
    created: float  # epoch seconds of the first commit
    updated: float  # epoch seconds of the last commit


@attrs.frozen
class Claim:
    """The right to drive one saga, held by this process until released."""

    saga_id: str
    token: int = 0  # a fencing token, for stores whose claims can expire


@runtime_checkable
class Store(Protocol):
    """A durable home for saga journals. Every method may raise `StoreError`."""

    def claim(self, saga_id: str) -> Claim | None:
        """Claim `saga_id` for this process, without waiting; None if a live process or
        another thread of this one holds it. The saga need not exist yet."""
        ...

    def release(self, claim: Claim) -> None:
        """Give the claim up; releasing twice is harmless."""
        ...

    def append(self, claim: Claim, commit: Commit) -> None:
        """Append one commit atomically; with seq 0 also create the saga from its header.

        `StoreError` if the claim is not held, seq is not the saga's next one, or seq 0
        names a saga that exists."""
        ...

    def load(self, saga_id: str) -> StoredSaga | None:
        """The saga as committed so far, or None."""
        ...

    def unfinished(self) -> list[str]:
        """Ids of sagas whose status is pending, running or compensating, oldest first."""
        ...

    def request_cancel(self, saga_id: str) -> bool:
        """Ask an unfinished saga to stop and roll back, from any process: True if it
        exists and has not ended. From then on, while the saga is pending or running, an
        append to it raises `CancelRequested` and writes nothing, unless it sets one of
        the statuses in `UNCANCELLED`."""
        ...

    def claim_next(self, limit: int) -> list[Claim]:
        """Claim up to `limit` unfinished sagas that nobody holds and that are not
        parked (see `Commit.due`), oldest first, without waiting. Concurrent callers
        never get the same saga."""
        ...

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        """Every saga, or those with `status`, oldest first."""
        ...

    def close(self) -> None:
        """Release every claim and resource; closing twice is harmless."""
        ...


class Reading:
    """`get` and `list`: stored sagas decoded for reading, from any process; and `with
    store:`, which closes the store at the end of the block.

    A mixin for stores, built on their `load`, `sagas` and `close`; decoding needs the
    classes of Enum and attrs values in the fields to be imported (nothing is ever
    imported for it).
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self: Store, *exc_info: object) -> None:
        self.close()

    def get(self: Store, saga_id: str) -> SagaRecord | None:
        """The saga `saga_id` (status, definition, fields, report so far), or None."""
        # Imported here: decoding a journal needs the executor's modules, which import
        # this package.
        from declsaga._reading import record_of  # noqa: PLC0415

        stored = self.load(saga_id)
        return None if stored is None else record_of(stored)

    def list(self: Store, status: str | None = None) -> list[SagaRecord]:
        """Every saga, or those with `status`, oldest first, decoded."""
        from declsaga._reading import record_of  # noqa: PLC0415

        return [record_of(stored) for stored in self.sagas(status)]
