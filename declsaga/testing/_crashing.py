"""`CrashingStore`: a store that kills its own process at a chosen commit."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Literal

from declsaga.stores._base import Claim, Commit, Store, StoredSaga

__all__ = ["CrashWhen", "CrashingStore"]

# -- crash helpers: kill the process at a chosen commit ------------------------------------

CrashWhen = Literal["before", "after"]


class CrashingStore:
    """A test utility: a `Store` that delegates everything to `store` and kills its own
    process with SIGKILL at the `kill_at`-th call of `append` (counted from 0).

    Every commit of a durable execution is one `append`, so the calls number the
    transitions of a saga, and killing at each one in turn reaches every crash point.
    `when="before"`: the process dies before the commit reaches the store, so it never
    lands. `when="after"`: the commit has landed, but the process dies before acting on
    it. Without `kill_at` the store only counts: `appends` tells how many commits an
    uninterrupted execution makes, which is how many crash points it has.

    SIGKILL cannot be caught: no `finally`, no atexit handler and no flush runs, exactly
    as when the machine's OOM killer or an operator ends the process. Use it in a child
    process; the parent sees the return code `-signal.SIGKILL`.
    """

    def __init__(
        self, store: Store, *, kill_at: int | None = None, when: CrashWhen = "before"
    ) -> None:
        if kill_at is not None and (type(kill_at) is not int or kill_at < 0):
            raise ValueError(f"kill_at must be None or an int >= 0, got {kill_at!r}.")
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}.")
        self.store = store
        self.kill_at = kill_at
        self.when: CrashWhen = when
        self._count = 0
        self._count_lock = threading.Lock()  # commits may arrive from several threads

    def __repr__(self) -> str:
        return f"CrashingStore({self.store!r}, kill_at={self.kill_at!r}, when={self.when!r})"

    @property
    def appends(self) -> int:
        """How many times `append` has been called so far."""
        return self._count

    def append(self, claim: Claim, commit: Commit) -> None:
        with self._count_lock:
            index = self._count
            self._count += 1
        kill = index == self.kill_at
        if kill and self.when == "before":
            _sigkill_self()
        self.store.append(claim, commit)
        if kill:
            _sigkill_self()

    def claim(self, saga_id: str) -> Claim | None:
        return self.store.claim(saga_id)

    def claim_next(self, limit: int) -> list[Claim]:
        return self.store.claim_next(limit)

    def request_cancel(self, saga_id: str) -> bool:
        return self.store.request_cancel(saga_id)

    def release(self, claim: Claim) -> None:
        self.store.release(claim)

    def load(self, saga_id: str) -> StoredSaga | None:
        return self.store.load(saga_id)

    def unfinished(self) -> list[str]:
        return self.store.unfinished()

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        return self.store.sagas(status)

    def close(self) -> None:
        self.store.close()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the Store protocol (a store's reading methods, say) passes through.
        if name == "store" or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.store, name)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    # POSIX delivers an unblockable signal sent to the calling process before kill()
    # returns; should it not, end with a different signal, so the test sees the mistake.
    os.abort()
