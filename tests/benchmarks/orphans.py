"""Sagas left unfinished by a process that died, for the recovery and takeover benchmarks.

`python orphans.py URL COUNT` starts COUNT sagas of `benchsagas.Ten` on the store at
URL and stops each at its second commit, as a crash would (its first step recorded as
started, its claim still held), then ends the process without releasing anything:
`os._exit`. On SQLite the kernel drops its claims at once; on PostgreSQL its leases run
out after the store's lease time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import benchsagas

from declsaga import Executor, StoreError
from declsaga.stores import Claim, Commit, Store, from_url


class StopsAtSecondCommit:
    """A store that fails every saga's second commit, like a process dying there."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def append(self, claim: Claim, commit: Commit) -> None:
        if commit.seq == 1:
            raise StoreError("the process dies here")
        self.inner.append(claim, commit)

    def release(self, claim: Claim) -> None:
        pass  # a dead process releases nothing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    store = from_url(url)
    executor = Executor(store=StopsAtSecondCommit(store))
    for _ in range(count):
        with contextlib.suppress(StoreError):
            executor.execute(benchsagas.TEN)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
