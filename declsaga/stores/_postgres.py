"""The PostgreSQL store: many workers on many hosts, one schema, a pool of connections.

A claim is a lease with a fencing token (a row of `claims`), not a lock the kernel
drops at death: a process cut off or paused for longer than its lease loses the saga to
whoever claims it next, and its appends are then refused (`LeaseLost`) because append
checks the token and the lease in the transaction that writes. A heartbeat thread renews
the leases of each store object every `lease / 3` seconds. Every append is one statement
(`_pg_sql._APPEND_*`); times come from the server's clock only.

psycopg and psycopg_pool are optional: imported by the constructor, so that importing
this module needs neither. Driver errors become `StoreError` in one place, `_store_error`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from declsaga._errors import CancelRequested, LeaseLost, StoreError

from . import _pg_sql as sql
from ._base import FINAL_STATUSES, UNCANCELLED, Claim, Commit, Reading, StoredSaga
from ._claims import (
    after_fork,
    check_claim_type,
    check_limit,
    check_status,
    conflict,
    not_claimed,
    prepare,
    saga_id_error,
    stored_saga,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresStore"]

_log = logging.getLogger("declsaga")

_EXTRA = "PostgresStore needs the optional extra: pip install 'declsaga[postgres]'"
_MAX_TIMEOUT = (2**31 - 1) // 1000  # PostgreSQL keeps lock_timeout in int milliseconds
_MAX_NAME = 63  # bytes: PostgreSQL cuts longer identifiers short, silently

# Pools inherited through fork: never used (their connections belong to the parent) and
# never closed (closing would end the parent's sessions), so kept from the collector.
_INHERITED: list[object] = []


def _require_driver() -> None:
    try:
        import psycopg  # noqa: F401, PLC0415 - optional, imported when a store is made
        import psycopg_pool  # noqa: F401, PLC0415
    except ImportError as error:
        raise ImportError(_EXTRA) from error


def _masked(dsn: str) -> str:
    """The DSN as a URL without its password, for messages and repr."""
    from psycopg import ProgrammingError  # noqa: PLC0415
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        # The parser's message may quote a piece of the DSN, which may be its password.
        raise ValueError("The DSN is not a valid PostgreSQL connection string.") from None
    user = str(params.get("user") or "")
    auth = f"{user}:***@" if params.get("password") else f"{user}@" if user else ""
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{auth}{host}{port}/{params.get('dbname') or ''}"


def _channel(schema: str) -> str:
    # NOTIFY's channel is an identifier too: a long schema name gets a digest instead.
    channel = f"declsaga_ended_{schema}"
    if len(channel.encode()) <= _MAX_NAME:
        return channel
    return f"declsaga_ended_{hashlib.sha256(schema.encode()).hexdigest()[:32]}"


def _owner() -> str:
    # Unique per store object and process; readable, for whoever looks at `claims`.
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(6)}"


def _seconds(what: str, value: object, most: int | None = None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"The {what} must be a number of seconds, not {value!r}.")
    if not 0 < value < math.inf or (most is not None and value > most):  # NaN fails too
        limit = "" if most is None else f" and at most {most}"
        raise ValueError(f"The {what} must be a number of seconds above 0{limit}, not {value!r}.")
    return float(value)


def _lease_lost(saga_id: str) -> LeaseLost:
    return LeaseLost(
        f"The lease on saga {saga_id!r} was lost: it expired, and another process may "
        "have taken the saga over. Nothing was written."
    )


class _Leases:
    """The claims one store object holds, saga id -> token; what `prepare` checks."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        # Claims found lost (by the heartbeat or an append) and not released yet: an
        # append with one is refused with LeaseLost rather than "not claimed".
        self.lost: dict[str, int] = {}

    def check(self, claim: Claim) -> None:
        check_claim_type(claim)
        # Single dict reads, atomic: no lock needed against the threads that change them.
        if self.held.get(claim.saga_id) == claim.token:
            return
        if self.lost.get(claim.saga_id) == claim.token:
            raise _lease_lost(claim.saga_id)
        raise not_claimed(claim.saga_id)


class PostgresStore(Reading):
    """A `Store` in a PostgreSQL schema, shared by any number of processes and hosts.

    `schema` is created (with its tables) if missing; a schema holding anything else is
    refused. `lease` is how long a claim outlives its holder's last heartbeat, in
    seconds: a saga whose process died is claimed again after it. `pool_size` bounds the
    connections of this object (a `wait_ended` call opens one more). `timeout` bounds
    waiting: for the server to accept a connection, for a connection of the pool, and
    for a row another transaction locks.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "declsaga",
        lease: float = 30.0,
        pool_size: int = 8,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"The DSN of a PostgreSQL store must be a str, not {dsn!r}.")
        if not isinstance(schema, str):
            raise TypeError(f"The schema must be a str, not {schema!r}.")
        if not 0 < len(schema.encode("utf-8", "surrogatepass")) <= _MAX_NAME or "\0" in schema:
            raise ValueError(
                f"The schema must be a name of 1 to {_MAX_NAME} bytes without NUL, not {schema!r}."
            )
        self.lease = _seconds("lease", lease)
        if not isinstance(pool_size, int) or isinstance(pool_size, bool):
            raise TypeError(f"The pool size must be an int, not {pool_size!r}.")
        if pool_size < 1:
            raise ValueError(f"The pool size must be at least 1, not {pool_size!r}.")
        self._timeout = _seconds("timeout", timeout, _MAX_TIMEOUT)
        _require_driver()
        import psycopg  # noqa: PLC0415

        self._errors = (psycopg.Error, UnicodeEncodeError)  # what the driver raises
        self.schema = schema
        self.dsn = _masked(dsn)
        self._dsn = dsn
        self._pool_size = pool_size
        self._channel = _channel(schema)
        self._lock = threading.Lock()  # leases, heartbeat and pool, as they change
        self._leases = _Leases()
        # Per pooled connection: the names of the appends prepared on it (see _append_row).
        self._prepared: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()
        self._owner = _owner()
        self._beating: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._pid = os.getpid()
        with self._translated("opening it"), self._connect(autocommit=True) as connection:
            if sql.schema_version(connection, schema, self.dsn) != sql.LATEST:
                sql.migrate(connection, schema, self.dsn)
            self._sql = sql.statements(schema, self._channel, connection)
        self._connections: ConnectionPool[Any] | None = self._open_pool()
        after_fork(self)

    def __repr__(self) -> str:
        return f"PostgresStore({self.dsn!r}, schema={self.schema!r})"

    # -- the driver boundary ----------------------------------------------------------------

    def _store_error(self, error: Exception, doing: str) -> StoreError:
        """The `StoreError` that a driver error raised while `doing` becomes."""
        from psycopg_pool import PoolTimeout  # noqa: PLC0415

        if getattr(error, "sqlstate", None) == "55P03":  # lock_not_available
            message = (
                f"The PostgreSQL database {self.dsn} kept a row locked beyond the timeout "
                f"of {self._timeout:g}s while {doing}: another transaction holds it."
            )
        elif isinstance(error, PoolTimeout):
            message = (
                f"No connection to the PostgreSQL database {self.dsn} was free within "
                f"{self._timeout:g}s while {doing} (the pool has {self._pool_size})."
            )
        else:
            detail = " ".join(str(error).split())  # libpq's messages span lines
            message = f"The PostgreSQL database {self.dsn} failed while {doing}: {detail}."
        store_error = StoreError(message)
        store_error.__cause__ = error
        return store_error

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Turn every driver error raised inside into a `StoreError`."""
        try:
            yield
        except self._errors as error:
            raise self._store_error(error, doing) from error

    def _connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        import psycopg  # noqa: PLC0415

        return psycopg.connect(self._dsn, autocommit=autocommit, **self._settings())

    def _settings(self) -> dict[str, Any]:
        # libpq counts connect_timeout in whole seconds.
        return {"connect_timeout": max(1, math.ceil(self._timeout))}

    def _open_pool(self) -> ConnectionPool[Any]:
        from psycopg_pool import ConnectionPool  # noqa: PLC0415

        pool: ConnectionPool[Any] = ConnectionPool(
            self._dsn,
            # Autocommit: every operation is one statement, so each is its own transaction,
            # and an append costs one round trip instead of three (BEGIN and COMMIT).
            kwargs={**self._settings(), "autocommit": True},
            min_size=1,
            max_size=self._pool_size,
            timeout=self._timeout,
            configure=self._configure,
            open=False,
            name=f"declsaga {self.dsn} {self.schema}",
        )
        try:
            with self._translated("opening its connections"):
                pool.open(wait=True, timeout=self._timeout)
        except BaseException:
            pool.close()
            raise
        return pool

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        milliseconds = f"{math.ceil(self._timeout * 1000)}ms"
        connection.execute("SELECT set_config('lock_timeout', %s, false)", (milliseconds,))
        connection.commit()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(
                f"The PostgreSQL store of {self.dsn}, schema {self.schema!r}, is closed."
            )

    def _pool(self) -> ConnectionPool[Any]:
        """This process's pool, opened again in a forked child."""
        self._check_open()
        if self._pid != os.getpid():
            self._after_fork()  # a fork that bypassed the at-fork hook
        pool = self._connections
        if pool is None:
            with self._lock:
                self._check_open()
                pool = self._connections
                if pool is None:
                    pool = self._connections = self._open_pool()
        return pool

    def _after_fork(self) -> None:
        # The parent's threads (and the locks they held, and the heartbeat) do not exist
        # here, its connections are its own, and its claims stay its own.
        if self._connections is not None:
            _INHERITED.append(self._connections)
        self._connections = None
        self._lock = threading.Lock()
        self._leases = _Leases()
        self._owner = _owner()
        self._beating = None
        self._stop = threading.Event()
        self._pid = os.getpid()

    # -- claims and their heartbeat ---------------------------------------------------------

    def claim(self, saga_id: str) -> Claim | None:
        if not isinstance(saga_id, str):
            raise saga_id_error(saga_id)
        with self._translated(f"claiming saga {saga_id!r}"), self._pool().connection() as conn:
            parameters = {"saga_id": saga_id, "owner": self._owner, "lease": self.lease}
            row = conn.execute(self._sql.claim, parameters).fetchone()
        return None if row is None else self._hold([(saga_id, row[0])])[0]

    def claim_next(self, limit: int) -> list[Claim]:
        """Claim up to `limit` unfinished sagas that nobody holds, oldest first."""
        check_limit(limit)
        with self._translated("claiming the next sagas"), self._pool().connection() as conn:
            parameters = {"limit": limit, "owner": self._owner, "lease": self.lease}
            rows = conn.execute(self._sql.claim_next, parameters).fetchall()
        return self._hold(rows)

    def _hold(self, taken: list[tuple[str, int]]) -> list[Claim]:
        with self._lock:
            for saga_id, token in taken:
                self._leases.held[saga_id] = token
                self._leases.lost.pop(saga_id, None)
            if taken and self._beating is None and not self._closed:
                self._beating = threading.Thread(
                    target=self._beat, name=f"declsaga heartbeat {self.schema}", daemon=True
                )
                self._beating.start()
        return [Claim(saga_id, token) for saga_id, token in taken]

    def _beat(self) -> None:
        """Renew every lease of this object, in one statement, every lease / 3 seconds;
        a lease it no longer finds is forgotten (its appends raise LeaseLost)."""
        stop = self._stop
        while not stop.wait(self.lease / 3):
            with self._lock:
                held = dict(self._leases.held)
            if not held:
                continue
            parameters = {"owner": self._owner, "lease": self.lease, "tokens": list(held.values())}
            try:
                with self._translated("renewing its leases"), self._pool().connection() as conn:
                    renewed = {row[0] for row in conn.execute(self._sql.renew, parameters)}
            except StoreError as error:
                if not stop.is_set():  # else closed meanwhile
                    _log.warning("The heartbeat failed; it will try again: %s", error)
                continue
            for saga_id, token in held.items():
                if token not in renewed:
                    self._lose(saga_id, token)

    def _lose(self, saga_id: str, token: int) -> None:
        with self._lock:
            if self._leases.held.get(saga_id) == token:  # else released meanwhile
                del self._leases.held[saga_id]
                self._leases.lost[saga_id] = token

    def release(self, claim: Claim) -> None:
        saga_id, token = claim.saga_id, claim.token
        with self._lock:
            leases = self._leases
            if leases.held.get(saga_id) == token:
                del leases.held[saga_id]
            elif leases.lost.get(saga_id) == token:
                del leases.lost[saga_id]
            else:
                return  # not this object's claim, or released already
        with self._translated(f"releasing saga {saga_id!r}"), self._pool().connection() as conn:
            conn.execute(self._sql.release, {"saga_id": saga_id, "token": token})

    # -- the Store protocol -----------------------------------------------------------------

    def append(self, claim: Claim, commit: Commit) -> None:
        self._check_open()
        prepared = prepare(self._leases, claim, commit)
        saga_id = prepared.saga_id
        name, fingerprint, definition, fields = prepared.header or (None, None, None, None)
        ended = prepared.status in FINAL_STATUSES
        values = (  # in the order of _pg_sql.APPEND_PARAMETERS
            saga_id,
            claim.token,
            prepared.seq,
            prepared.entries,
            prepared.status,
            ended,
            self._channel,
            name,
            fingerprint,
            definition,
            fields,
            prepared.status in UNCANCELLED,
            prepared.due,
        )
        if prepared.seq == 0:
            which = "append_first"
        elif prepared.status is None and prepared.due is None:
            which = "append_next"
        else:
            which = "append_status"
        with self._translated(f"appending to saga {saga_id!r}"), self._pool().connection() as conn:
            leased, appended, commits, cancelled = self._append_row(conn, which, values)
        if not leased:
            self._lose(saga_id, claim.token)
            raise _lease_lost(saga_id)
        if not appended:
            if cancelled and commits == prepared.seq:
                raise CancelRequested(saga_id)
            raise conflict(saga_id, prepared.seq, commits)
        if ended:  # the statement ended the claim: nothing to release
            with self._lock:
                if self._leases.held.get(saga_id) == claim.token:
                    del self._leases.held[saga_id]

    def _append_row(
        self, conn: psycopg.Connection[Any], which: str, values: tuple[object, ...]
    ) -> tuple[bool, bool, int, bool]:
        """Run an append statement on libpq directly, prepared once per connection: it
        is the hot path, and psycopg's own execute costs several times more CPU than the
        statement's round trip needs. Returns (lease held, appended, commits so far, refused
        for a cancel)."""
        from psycopg import pq  # noqa: PLC0415

        pgconn = conn.pgconn
        name = _PREPARED_NAMES[which]
        prepared = self._prepared.setdefault(conn, set())
        if name not in prepared:
            statement: bytes = getattr(self._sql, which)
            _check_result(pgconn.prepare(name, statement, _APPEND_TYPES), pq.ExecStatus.COMMAND_OK)
            prepared.add(name)
        # None is SQL NULL: libpq takes it, though psycopg's annotation leaves it out.
        parameters = cast("list[bytes]", [_text(value) for value in values])
        result = pgconn.exec_prepared(name, parameters)
        _check_result(result, pq.ExecStatus.TUPLES_OK)
        if result.ntuples == 0:  # the flat hot path appended nothing: ask why
            return self._append_row(conn, "diagnose", values)
        commits = result.get_value(0, 2)
        return (
            result.get_value(0, 0) == b"t",
            result.get_value(0, 1) == b"t",
            0 if commits is None else int(commits),
            result.get_value(0, 3) == b"t",
        )

    def request_cancel(self, saga_id: str) -> bool:
        with self._translated(f"cancelling saga {saga_id!r}"), self._pool().connection() as conn:
            return conn.execute(self._sql.request_cancel, (saga_id,)).fetchone() is not None

    def load(self, saga_id: str) -> StoredSaga | None:
        with self._translated(f"loading saga {saga_id!r}"), self._pool().connection() as conn:
            row = conn.execute(self._sql.load, (saga_id,), binary=True).fetchone()
        return None if row is None else _stored(row)

    def unfinished(self) -> list[str]:
        with self._translated("listing unfinished sagas"), self._pool().connection() as conn:
            return [row[0] for row in conn.execute(self._sql.unfinished)]

    def sagas(self, status: str | None = None) -> list[StoredSaga]:
        if status is not None:
            check_status(status)
        with self._translated("listing sagas"), self._pool().connection() as conn:
            if status is None:
                rows = conn.execute(self._sql.all, binary=True).fetchall()
            else:
                rows = conn.execute(self._sql.with_status, (status,), binary=True).fetchall()
        return [_stored(row) for row in rows]

    def wait_ended(self, saga_id: str, timeout: float) -> None:
        """Return once saga `saga_id` may have ended, or after `timeout` seconds; the
        caller checks with `load`. Listens on a connection of its own."""
        if not isinstance(saga_id, str):
            raise saga_id_error(saga_id)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise TypeError(f"The timeout must be a number of seconds, not {timeout!r}.")
        if math.isnan(timeout):
            raise ValueError("The timeout must be a number of seconds, not nan.")
        self._check_open()
        deadline = time.monotonic() + timeout
        with (
            self._translated(f"waiting for saga {saga_id!r} to end"),
            self._connect(autocommit=True) as conn,
        ):
            # Listen first, then look: a saga that ends in between is not missed.
            conn.execute(self._sql.listen)
            row = conn.execute(self._sql.status, (saga_id,)).fetchone()
            if row is not None and row[0] in FINAL_STATUSES:
                return
            # A negative timeout (a caller's deadline just passed) is no wait.
            left = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            for notify in conn.notifies(timeout=left):
                if notify.payload == saga_id:
                    return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            beating, self._beating = self._beating, None
            pool, self._connections = self._connections, None
            held = bool(self._leases.held or self._leases.lost)
            self._leases = _Leases()
        self._stop.set()
        if beating is not None:
            beating.join()
        if pool is None:
            return
        try:
            if held:
                with self._translated("releasing its claims"), pool.connection() as conn:
                    conn.execute(self._sql.release_all, {"owner": self._owner})
        finally:
            pool.close()


_PREPARED_NAMES = {
    which: f"declsaga_{which}".encode()
    for which in ("append_first", "append_next", "append_status", "diagnose")
}
_APPEND_TYPES = [oid for _, oid in sql.APPEND_PARAMETERS]


def _text(value: object) -> bytes | None:
    """A parameter in PostgreSQL's text format."""
    if value is None:
        return None
    if value is True or value is False:
        return b"t" if value else b"f"
    return str(value).encode()  # str and int; a lone surrogate raises UnicodeEncodeError


def _check_result(result: Any, expected: object) -> None:
    """Raise the psycopg error that a failed libpq result stands for."""
    if result.status == expected:
        return
    import psycopg  # noqa: PLC0415
    from psycopg import errors, pq  # noqa: PLC0415

    message = result.error_message.decode("utf-8", "replace").strip()
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    try:
        cls = errors.lookup(sqlstate.decode()) if sqlstate else psycopg.DatabaseError
    except KeyError:
        cls = psycopg.DatabaseError
    raise cls(message or "the statement failed")


def _stored(row: tuple[Any, ...]) -> StoredSaga:
    """A saga from a row of `_pg_sql._SAGAS`."""
    saga_id, name, fingerprint, definition, fields, status, created, entries, ats = row
    commits = zip(entries or (), ats or (), strict=True)
    return stored_saga(saga_id, (name, fingerprint, definition, fields), status, created, commits)
