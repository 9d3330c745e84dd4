"""Sagas for the worker tests, importable by worker processes (`--import workersagas`).

Every step records two side effects where the environment variable `DECLSAGA_EFFECTS`
says: `start` before its work and `end` after it, with the run's idempotency key, the pid
and a wall-clock time. A run whose process was killed mid-step has a `start` and no
`end`. `DECLSAGA_EFFECTS` is either a file, which gets one line of JSON per effect (one
`write` on an `O_APPEND` descriptor: the line is there the moment the call returns,
whatever kills the process next), or `postgresql://...#schema`, whose table `effects`
gets one row per effect, committed before the call returns.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import attrs

from declsaga import Context, Saga, compensates, step
from declsaga.policies import Retry

# In-process tests control steps through these.
GATES: dict[str, threading.Event] = {}  # saga id -> the event its `hold` step waits for
ENTERED: dict[str, threading.Event] = {}  # saga id -> set when its `hold` step starts


_COLUMNS = ("saga", "action", "key", "phase", "pid", "at")
_TABLE: dict[int, Any] = {}  # pid -> this process's connection to the effects table


def effect(ctx: Context, what: str, phase: str) -> None:
    where = os.environ.get("DECLSAGA_EFFECTS")
    if not where:
        return
    row = (ctx.saga_id, what, ctx.idempotency_key, phase, os.getpid(), time.time())
    if where.startswith("postgresql://"):
        _insert(where, row)
        return
    fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(dict(zip(_COLUMNS, row, strict=True))) + "\n").encode())
    finally:
        os.close(fd)


def _table(where: str) -> tuple[str, Any]:
    from psycopg import sql  # noqa: PLC0415 - only the PostgreSQL tests need it

    dsn, _, schema = where.partition("#")
    return dsn, sql.Identifier(schema, "effects")


def create_effects_table(where: str) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    dsn, table = _table(where)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            sql.SQL(
                "CREATE TABLE {} (saga TEXT, action TEXT, key TEXT, phase TEXT, pid INT, "
                "at DOUBLE PRECISION)"
            ).format(table)
        )


def _insert(where: str, row: tuple[Any, ...]) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    dsn, table = _table(where)
    connection = _TABLE.get(os.getpid())
    if connection is None:  # one autocommit connection per process, shared by its threads
        connection = _TABLE[os.getpid()] = psycopg.connect(dsn, autocommit=True)
    connection.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(table), row)


def read_effects(where: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every effect recorded so far, in the order recorded."""
    where = os.fspath(where)
    if where.startswith("postgresql://"):
        import psycopg  # noqa: PLC0415
        from psycopg import sql  # noqa: PLC0415

        dsn, table = _table(where)
        with psycopg.connect(dsn, autocommit=True) as connection:
            rows = connection.execute(sql.SQL("SELECT * FROM {} ORDER BY at").format(table))
            return [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
    try:
        with open(where, encoding="utf-8") as lines:
            return [json.loads(line) for line in lines]
    except FileNotFoundError:
        return []


class Transfer(Saga, name="tests.workers.Transfer"):
    """Three steps of `work_ms` each (`debit` takes `debit_ms` if given); `fail=True`
    makes the last one fail, which `reverse` and `refund` undo."""

    amount: int = 0
    work_ms: int = 0
    debit_ms: int | None = None
    fail: bool = False
    done: list[str] = attrs.field(factory=list)

    def _work(self, ctx: Context, what: str) -> None:
        effect(ctx, what, "start")
        work_ms = self.debit_ms if what == "debit" and self.debit_ms is not None else self.work_ms
        if work_ms:
            time.sleep(work_ms / 1000)
        effect(ctx, what, "end")
        self.done = [*self.done, what]

    @step(order=1)
    def debit(self, ctx: Context) -> None:
        self._work(ctx, "debit")

    @step(order=2)
    def credit(self, ctx: Context) -> None:
        self._work(ctx, "credit")

    @step(order=3)
    def notify(self, ctx: Context) -> None:
        self._work(ctx, "notify")
        if self.fail:
            raise RuntimeError(f"cannot notify about {self.amount}")

    @compensates("debit")
    def refund(self, ctx: Context) -> None:
        self._work(ctx, "refund")

    @compensates("credit")
    def reverse(self, ctx: Context) -> None:
        self._work(ctx, "reverse")


class Held(Saga, name="tests.workers.Held"):
    """Its second step waits for `GATES[saga_id]` (in-process tests only)."""

    done: list[str] = attrs.field(factory=list)

    @step(order=1)
    def first(self, ctx: Context) -> None:
        self.done = [*self.done, "first"]

    @step(order=2)
    def hold(self, ctx: Context) -> None:
        ENTERED.setdefault(ctx.saga_id, threading.Event()).set()
        gate = GATES.setdefault(ctx.saga_id, threading.Event())
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        self.done = [*self.done, "hold"]

    @step(order=3)
    def last(self, ctx: Context) -> None:
        self.done = [*self.done, "last"]


class Flaky(Saga, name="tests.workers.Flaky"):
    """Its one step fails its first attempt; the retry waits 0.4 s."""

    attempts: list[int] = attrs.field(factory=list)

    @step(order=1, retry=Retry(attempts=3, backoff=0.4, jitter=0, on=(ConnectionError,)))
    def call(self, ctx: Context) -> None:
        effect(ctx, "call", f"attempt {ctx.attempt}")
        self.attempts = [*self.attempts, ctx.attempt]
        if ctx.attempt == 1:
            raise ConnectionError("the service is restarting")
