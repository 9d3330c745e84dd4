"""The SQLite store: one file, several processes of one host, one connection per store.

Driver errors become `StoreError` in one place, `_store_error` (through `_translated`,
or spelled out on the append path). Every write is one `BEGIN IMMEDIATE` transaction,
rolled back in a `finally` when it fails; reads are short deferred transactions. Appends
that arrive together from several threads share one transaction and one fsync (group
commit): one thread at a time leads, committing every queued append at once, while the
others wait to be told their own outcome or to lead. Appends from event loops
(`append_async`) join the same queue but never lead, since the busy handler sleeps: a
worker thread leads for them, and wakes the tasks of each loop with one call per batch.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from declsaga import _threads
from declsaga._errors import CancelRequested, StoreError
from declsaga._loops import Handoff, deliver_all

from . import _migrations as sql
from ._base import UNCANCELLED, Claim, Commit, Reading, StoredSaga
from ._claims import (
    Claims,
    Prepared,
    after_fork,
    check_status,
    claim_unfinished,
    conflict,
    prepare,
    refused,
    stored_saga,
)

__all__ = ["SQLiteStore"]

# PRAGMA takes no parameters, so each setting has its own constant statement.
_SYNCHRONOUS = {
    "OFF": ("PRAGMA synchronous = OFF", 0),
    "NORMAL": ("PRAGMA synchronous = NORMAL", 1),
    "FULL": ("PRAGMA synchronous = FULL", 2),
    "EXTRA": ("PRAGMA synchronous = EXTRA", 3),
}
_PRAGMAS = {
    "journal_mode": "PRAGMA journal_mode",
    "synchronous": "PRAGMA synchronous",
    "busy_timeout": "PRAGMA busy_timeout",
}
_MAX_TIMEOUT = (2**31 - 1) // 1000  # SQLite keeps the busy timeout in int milliseconds

# What the driver raises: sqlite3's errors, and the encoding of a str that is not UTF-8.
_DRIVER_ERRORS = (sqlite3.Error, UnicodeEncodeError)

# Connections inherited through fork: never used (SQLite forbids it) and never closed
# (closing could let SQLite act on locks and WAL files that belong to the parent).
_INHERITED: list[sqlite3.Connection] = []


class _MemberFailed(Exception):
    """One append of a shared transaction failed in the driver: retry them one by one."""


class _Waiter:
    """An append waiting for whoever commits the queue."""

    __slots__ = ("done", "error", "handoff", "prepared", "wake")

    def __init__(self, prepared: Prepared, handoff: Handoff | None = None) -> None:
        self.prepared = prepared
        self.done = False
        self.error: StoreError | None = None
        # Set when the append is committed or refused, or when it is this thread's turn
        # to lead; None for an append that leads from the start, or comes from a loop.
        self.wake: threading.Event | None = None
        # For an append from an event loop: delivered once it is settled. Such an append
        # never leads: a worker thread leads for it.
        self.handoff = handoff

    def settle(self, error: StoreError | None) -> None:
        self.done, self.error = True, error
        if self.wake is not None:
            self.wake.set()


def _copy(error: StoreError) -> StoreError:
    # Each waiting thread raises its own exception object: one object raised in several
    # threads at once would collect their tracebacks into one.
    copy = StoreError(*error.args)
    copy.__cause__ = error.__cause__
    return copy


class SQLiteStore(Reading):
    """A `Store` in one SQLite file, shared by the processes of one host.

    `synchronous` is SQLite's setting: FULL (default) makes every commit durable at
    once; NORMAL loses the last commits on power loss, not on a process crash. `timeout`
    is how long a write waits for another process's transaction, in seconds. Claims are
    locks on the side file `<path>-claims`; ":memory:" gives a private database whose
    claims hold within this process only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(
                f"The synchronous setting must be OFF, NORMAL, FULL or EXTRA (in any case), "
                f"not {synchronous!r}."
            )
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not (0 < timeout <= _MAX_TIMEOUT)  # NaN fails this too
        ):
            raise ValueError(
                f"The busy timeout must be a number of seconds above 0 and at most "
                f"{_MAX_TIMEOUT}, not {timeout!r}."
            )
        name = os.fspath(path)
        if not isinstance(name, str):
            raise TypeError(f"The path of a SQLite store must be a str, not {name!r}.")
        self.path = name
        self._memory = name == ":memory:"
        # Absolute, so that a later chdir cannot point a reopened connection elsewhere.
        self._file = name if self._memory else os.path.abspath(name)
        self._synchronous = synchronous.upper()
        self._timeout = float(timeout)
        self._lock = threading.Lock()  # the connection, and the transaction on it
        self._queue_lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._leading = False  # a thread is committing the queue, or is about to
        self._closed = False
        self._claims = Claims(None if self._memory else self._file + "-claims")
        self._pid = os.getpid()
        self._connection: sqlite3.Connection | None = self._open()
        after_fork(self)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, synchronous={self._synchronous!r})"

    # -- the driver boundary ----------------------------------------------------------------

    def _store_error(self, error: Exception, doing: str) -> StoreError:
        """The `StoreError` that a driver error raised while `doing` becomes."""
        name = getattr(error, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            message = (
                f"The database {self.path} stayed locked beyond the busy timeout of "
                f"{self._timeout:g}s while {doing}: another connection holds a write "
                "transaction."
            )
        elif name == "SQLITE_NOTADB":
            message = f"The file {self.path} is not a SQLite database; it was left unchanged."
        else:
            message = f"The database {self.path} failed while {doing}: {error}."
        store_error = StoreError(message)
        store_error.__cause__ = error
        return store_error

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Turn every driver error raised inside into a `StoreError` naming the file."""
        try:
            yield
        except _DRIVER_ERRORS as error:
            raise self._store_error(error, doing) from error

    @staticmethod
    @contextmanager
    def _transaction(connection: sqlite3.Connection, begin: str) -> Iterator[None]:
        connection.execute(begin)
        try:
            yield
            connection.execute("COMMIT")
        finally:
            if connection.in_transaction:
                # The error that got us here matters, not a failing rollback.
                with suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"The store of {self.path} is closed.")

    def _conn(self) -> sqlite3.Connection:
        """This process's connection; call with `_lock` held."""
        self._check_open()
        if self._pid != os.getpid():
            self._forget_connection()  # a fork that bypassed the at-fork hook
        if self._connection is None:
            if self._memory:
                raise StoreError(
                    "A ':memory:' store cannot be used in a forked child: its database "
                    "stayed with the parent process."
                )
            self._connection = self._open()
        return self._connection

    def _forget_connection(self) -> None:
        if self._connection is not None:
            _INHERITED.append(self._connection)
        self._connection = None
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        # Threads of the parent may have held these at the fork; they do not exist here.
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue = []
        self._leading = False
        self._forget_connection()

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        with self._translated("opening it"):
            connection = sqlite3.connect(
                self._file, timeout=self._timeout, check_same_thread=False, isolation_level=None
            )
            try:
                self._prepare(connection)
            except BaseException:
                connection.close()
                raise
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        # Refuse a foreign or newer file before anything writes to it: switching to WAL
        # rewrites the header, so it comes after the check.
        version = sql.schema_version(connection, self.path)
        if not self._memory:
            mode = self._switch_to_wal(connection)
            if mode != "wal":
                raise StoreError(
                    f"The database {self.path} could not be switched to WAL mode; it "
                    f"stays in {mode} mode."
                )
        statement, level = _SYNCHRONOUS[self._synchronous]
        connection.execute(statement)
        if connection.execute("PRAGMA synchronous").fetchone()[0] != level:
            raise StoreError(f"The database {self.path} refused synchronous={self._synchronous}.")
        if version < sql.LATEST:
            with self._transaction(connection, "BEGIN IMMEDIATE"):
                sql.migrate(connection, self.path)

    def _switch_to_wal(self, connection: sqlite3.Connection) -> str:
        # Switching a new file to WAL takes an exclusive lock without calling the busy
        # handler, so processes opening one new file together fail at once: retry, for as
        # long as a write would wait.
        deadline = time.monotonic() + self._timeout
        pause = 0.001
        while True:
            try:
                return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as error:
                if error.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    # -- the Store protocol -----------------------------------------------------------------

    def claim(self, saga_id: str) -> Claim | None:
        self._check_open()
        return self._claims.claim(saga_id)

    def release(self, claim: Claim) -> None:
        self._claims.release(claim)

    def append(self, claim: Claim, commit: Commit) -> None:
        if self._closed:
            self._check_open()
        waiter = _Waiter(prepare(self._claims, claim, commit))
        with self._queue_lock:
            self._queue.append(waiter)
            if self._leading:
                wake = waiter.wake = threading.Event()
            else:
                self._leading = True
                wake = None
        if wake is not None:
            try:
                wake.wait()  # until committed, or until the lead passes here
            except BaseException:
                self._withdraw(waiter)
                raise
        if not waiter.done and self._lead():
            self._lead_in_worker()
        if waiter.error is not None:
            raise waiter.error

    async def append_async(self, claim: Claim, commit: Commit) -> None:
        """`append` from a running event loop, which it never blocks.

        The commit is checked and encoded at once, then written by a worker thread in
        one transaction with every append queued meanwhile (from loops and threads
        alike); the waiting tasks of one loop are woken together. If the awaiting task
        is cancelled meanwhile, the append still completes: its `StoreError` is raised
        if it failed, else the cancellation propagates (so a `CancelledError` means the
        commit is durable)."""
        if self._closed:
            self._check_open()
        handoff = Handoff(asyncio.get_running_loop())
        waiter = _Waiter(prepare(self._claims, claim, commit), handoff)
        with self._queue_lock:
            self._queue.append(waiter)
            lead = not self._leading
            self._leading = True
        if lead:
            self._lead_in_worker()
        cancelled = await handoff.wait()
        if waiter.error is not None:
            raise waiter.error
        if cancelled is not None:
            raise cancelled

    def _lead(self) -> bool:
        """Commit every queued append, then pass the lead to the first one queued since.

        Followers wait on their own event rather than on the connection's lock, so that
        the lead goes to the oldest waiter instead of to whichever thread barges in.
        True if the oldest is from an event loop: the caller must see that a worker
        thread leads next."""
        try:
            with self._lock:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        except BaseException:
            with self._queue_lock:
                again = self._pass_lead()
            if again:
                self._lead_in_worker()
            raise
        with self._queue_lock:
            return self._pass_lead()

    def _pass_lead(self) -> bool:
        """Wake the oldest queued append to lead, or give the lead up. True if the oldest
        is from an event loop, which cannot lead; the lead stays taken for a worker.
        Called with the queue's lock held."""
        if not self._queue:
            self._leading = False
            return False
        successor = self._queue[0].wake
        if successor is None:
            return True
        successor.set()  # it is not done, so it leads
        return False

    def _lead_in_worker(self) -> None:
        """Have a worker thread take the lead, which the caller holds on its behalf."""
        _threads.run(self._lead_for_loops)

    def _lead_for_loops(self) -> None:
        while self._lead():
            pass

    def _withdraw(self, waiter: _Waiter) -> None:
        """A follower interrupted while waiting: withdraw its append if nobody took it yet,
        and pass on the lead if it was handed to it."""
        with self._queue_lock:
            again = False
            if any(queued is waiter for queued in self._queue):
                self._queue.remove(waiter)
                if waiter.wake is not None and waiter.wake.is_set():
                    again = self._pass_lead()
        if again:
            self._lead_in_worker()

    def _commit(self, batch: list[_Waiter]) -> None:
        """Commit the queued appends in one transaction and settle every waiter."""
        try:
            try:
                outcomes = self._apply(batch)
            except _MemberFailed:
                # One append broke the shared transaction: each alone gets its own outcome.
                for waiter in batch:
                    try:
                        waiter.settle(self._apply([waiter])[0])
                    except StoreError as error:
                        waiter.settle(error)
            except StoreError as error:
                for waiter in batch:
                    waiter.settle(_copy(error) if len(batch) > 1 else error)
            else:
                for waiter, outcome in zip(batch, outcomes, strict=True):
                    waiter.settle(outcome)
        finally:
            handoffs = []
            for waiter in batch:  # interrupted (KeyboardInterrupt): nobody may wait silently
                if not waiter.done:
                    waiter.settle(StoreError(f"An append to {self.path} was interrupted."))
                if waiter.handoff is not None:
                    handoffs.append(waiter.handoff)
            if handoffs:
                deliver_all(handoffs)

    def _apply(self, batch: list[_Waiter]) -> list[StoreError | None]:
        # The hot path: `_translated` and `_transaction`, spelled out without generators.
        now = time.time()
        try:
            connection = self._conn()
            connection.execute("BEGIN IMMEDIATE")
            try:
                try:
                    outcomes = [self._write(connection, waiter.prepared, now) for waiter in batch]
                except _DRIVER_ERRORS as error:
                    if len(batch) == 1:
                        raise
                    raise _MemberFailed from error
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    # The error that got us here matters, not a failing rollback.
                    with suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
        except _DRIVER_ERRORS as error:
            raise self._store_error(error, "appending") from error
        return outcomes

    @staticmethod
    def _write(connection: sqlite3.Connection, commit: Prepared, now: float) -> StoreError | None:
        """One commit inside the open transaction: its conflict, having written nothing,
        or None."""
        saga_id = commit.saga_id
        execute = connection.execute
        # The saga's row first: the journal's rows are keyed by its number. Ignored if
        # the saga exists, which makes this first commit a conflict.
        if (
            commit.header is not None
            and execute(sql.CREATE, (saga_id, *commit.header, commit.status, now, now)).rowcount
            == 0
        ) or execute(
            sql.APPEND, (saga_id, commit.seq, commit.entries, now, commit.status in UNCANCELLED)
        ).rowcount == 0:
            commits = execute(sql.COUNT, (saga_id,)).fetchone()[0]
            row = execute(sql.CANCELLED, (saga_id,)).fetchone()
            if (
                commits == commit.seq  # its next commit, refused only for the cancel
                and row is not None
                and refused(bool(row[0]), row[1], commit.status)
            ):
                return CancelRequested(saga_id)
            return conflict(saga_id, commit.seq, commits)
        if commit.header is None and commit.status is not None:
            execute(sql.SET_STATUS, (commit.status, now, saga_id))
        if commit.due is not None:
            execute(sql.SET_DUE, (commit.due, saga_id))
        return None

    def request_cancel(self, saga_id: str) -> bool:
        with self._lock, self._translated(f"cancelling saga {saga_id!r}"):
            connection = self._conn()
            with self._transaction(connection, "BEGIN IMMEDIATE"):
                return connection.execute(sql.REQUEST_CANCEL, (saga_id,)).rowcount > 0

    def load(self, saga_id: str) -> StoredSaga | None:
        with self._lock, self._translated(f"loading saga {saga_id!r}"):
            connection = self._conn()
            with self._transaction(connection, "BEGIN"):
                row = connection.execute(sql.LOAD, (saga_id,)).fetchone()
                if row is None:
                    return None
                commits = connection.execute(sql.LOAD_JOURNAL, (saga_id,)).fetchall()
        # Decoded outside the lock: other threads need not wait for the JSON parser.
        return stored_saga(row[0], row[1:5], row[5], row[6], commits)

    def unfinished(self) -> list[str]:
        with self._lock, self._translated("listing unfinished sagas"):
            rows = self._conn().execute(sql.UNFINISHED).fetchall()
        return [row[0] for row in rows]

    def claim_next(self, limit: int) -> list[Claim]:
        with self._lock, self._translated("listing sagas to claim"):
            rows = self._conn().execute(sql.READY, (time.time(),)).fetchall()
        return claim_unfinished(self, limit, [row[0] for row in rows])

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        parameters: tuple[str, ...] = ()
        sagas_sql, journals_sql = sql.ALL, sql.ALL_JOURNALS
        if status is not None:
            parameters = (check_status(status),)
            sagas_sql, journals_sql = sql.WITH_STATUS, sql.JOURNALS_WITH_STATUS
        with self._lock, self._translated("listing sagas"):
            connection = self._conn()
            with self._transaction(connection, "BEGIN"):
                rows = connection.execute(sagas_sql, parameters).fetchall()
                journals = connection.execute(journals_sql, parameters).fetchall()
        commits: dict[str, list[tuple[str, float]]] = {}
        for saga_id, entries, at in journals:
            commits.setdefault(saga_id, []).append((entries, at))
        return [
            stored_saga(row[0], row[1:5], row[5], row[6], commits.get(row[0], [])) for row in rows
        ]

    def pragmas(self) -> dict[str, object]:
        """The settings in effect on the store's own connection, for tests and diagnosis:
        journal_mode, synchronous (0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA), busy_timeout (ms)."""
        with self._lock, self._translated("reading its settings"):
            connection = self._conn()
            return {name: connection.execute(sql).fetchone()[0] for name, sql in _PRAGMAS.items()}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connection, self._connection = self._connection, None
            try:
                if connection is not None:
                    with self._translated("closing it"):
                        connection.close()
            finally:
                self._claims.close()
