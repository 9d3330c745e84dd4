"""Stores that wrap another for tests: they pass every call on, and intercept `append`
to count commits or to stop an execution where a dead process would have stopped."""

from __future__ import annotations

from declsaga import StoreError
from declsaga.stores import Claim, Commit, Store, StoredSaga

__all__ = ["CRASH", "Counting", "Crashing", "Delegate"]


class Delegate:
    """A store that passes every call on to another; subclasses intercept `append`."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def claim(self, saga_id: str) -> Claim | None:
        return self.inner.claim(saga_id)

    def release(self, claim: Claim) -> None:
        self.inner.release(claim)

    def append(self, claim: Claim, commit: Commit) -> None:
        self.inner.append(claim, commit)

    def load(self, saga_id: str) -> StoredSaga | None:
        return self.inner.load(saga_id)

    def unfinished(self) -> list[str]:
        return self.inner.unfinished()

    def claim_next(self, limit: int) -> list[Claim]:
        return self.inner.claim_next(limit)

    def request_cancel(self, saga_id: str) -> bool:
        return self.inner.request_cancel(saga_id)

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        return self.inner.sagas(status)

    def close(self) -> None:
        self.inner.close()


class Counting(Delegate):
    """Keeps every commit appended through it."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.commits: list[Commit] = []

    def append(self, claim: Claim, commit: Commit) -> None:
        self.inner.append(claim, commit)
        self.commits.append(commit)


CRASH = "The process died here."


class Crashing(Delegate):
    """Its `at`-th append raises `StoreError(CRASH)`: before the commit reaches the store,
    or just after it landed (`landed=True`). Every later append fails too."""

    def __init__(self, inner: Store, at: int, *, landed: bool = False) -> None:
        super().__init__(inner)
        self.at = at
        self.landed = landed
        self.appends = 0

    def append(self, claim: Claim, commit: Commit) -> None:
        self.appends += 1
        if self.appends > self.at or (self.appends == self.at and not self.landed):
            raise StoreError(CRASH)
        self.inner.append(claim, commit)
        if self.appends == self.at:
            raise StoreError(CRASH)
