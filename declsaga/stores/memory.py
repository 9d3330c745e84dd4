"""The in-memory reference store: the contract with nothing in the way.

It keeps what a database would keep, the JSON texts of every commit, and decodes them on
the way out, so that values come back exactly as from a real store (tuples as lists,
keys as strings) and never share state with the caller's objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import attrs

from declsaga._errors import CancelRequested, StoreError

from ._base import FINAL_STATUSES, Claim, Commit, Reading, StoredSaga
from ._claims import (
    Claims,
    after_fork,
    check_status,
    claim_unfinished,
    conflict,
    prepare,
    refused,
    stored_saga,
)

__all__ = ["MemoryStore"]


@attrs.define
class _Row:
    header: tuple[str, str, str, str]
    status: str
    created: float
    commits: list[tuple[str, float]]  # (entries as JSON text, time of the commit)
    cancel: bool = False  # cancel() was asked
    due: float = 0.0  # parked until then


_Saga = tuple[str, tuple[str, str, str, str], str, float, list[tuple[str, float]]]


class MemoryStore(Reading):
    """A `Store` in this process's memory, for tests and for sagas that need not survive
    the process. Thread-safe; claims hold between the threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sagas: dict[str, _Row] = {}  # in creation order
        self._claims = Claims(None)
        self._closed = False
        after_fork(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The memory store is closed.")

    def claim(self, saga_id: str) -> Claim | None:
        self._check_open()
        return self._claims.claim(saga_id)

    def release(self, claim: Claim) -> None:
        self._claims.release(claim)

    def append(self, claim: Claim, commit: Commit) -> None:
        self._check_open()
        prepared = prepare(self._claims, claim, commit)
        with self._lock:
            self._check_open()
            now = time.time()
            row = self._sagas.get(prepared.saga_id)
            commits = len(row.commits) if row is not None else 0
            if prepared.seq != commits:
                raise conflict(prepared.saga_id, prepared.seq, commits)
            if row is not None and refused(row.cancel, row.status, prepared.status):
                raise CancelRequested(prepared.saga_id)
            if row is None:
                assert prepared.header is not None and prepared.status is not None
                row = _Row(prepared.header, prepared.status, now, [])
                self._sagas[prepared.saga_id] = row
            elif prepared.status is not None:
                row.status = prepared.status
            if prepared.due is not None:
                row.due = prepared.due
            row.commits.append((prepared.entries, now))

    def _snapshot(self, keep: Callable[[_Row], bool]) -> list[_Saga]:
        """The rows `keep` selects, oldest first, copied under the lock; the texts are
        immutable, so only the lists need copying, and decoding happens outside it."""
        with self._lock:
            self._check_open()
            rows = [
                (saga_id, row.header, row.status, row.created, list(row.commits))
                for saga_id, row in self._sagas.items()
                if keep(row)
            ]
        # sorted() is stable: sagas created within one clock tick stay in creation order.
        return sorted(rows, key=lambda saga: saga[3])

    def load(self, saga_id: str) -> StoredSaga | None:
        with self._lock:
            self._check_open()
            row = self._sagas.get(saga_id)
            if row is None:
                return None
            status, created, commits = row.status, row.created, list(row.commits)
        return stored_saga(saga_id, row.header, status, created, commits)

    def unfinished(self) -> list[str]:
        found = self._snapshot(lambda row: row.status not in FINAL_STATUSES)
        return [saga[0] for saga in found]

    def request_cancel(self, saga_id: str) -> bool:
        with self._lock:
            self._check_open()
            row = self._sagas.get(saga_id)
            if row is None or row.status in FINAL_STATUSES:
                return False
            row.cancel = True
            return True

    def claim_next(self, limit: int) -> list[Claim]:
        now = time.time()
        ready = self._snapshot(lambda row: row.status not in FINAL_STATUSES and row.due <= now)
        return claim_unfinished(self, limit, [saga[0] for saga in ready])

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        if status is not None:
            check_status(status)
        found = self._snapshot(lambda row: status is None or row.status == status)
        return [stored_saga(*saga) for saga in found]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._claims.close()
