"""The PostgreSQL store: the conformance suite, then what only leases and a server have to
prove (expiry and fencing, the heartbeat, concurrent workers, notifications, refusals,
masked passwords, the optional driver, fork).

Every test runs in a schema of its own, dropped afterwards (tests/pg.py). The server must
be reachable: these tests fail, never skip, without it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pg import POSTGRES_DSN, fresh_schema
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from declsaga._errors import LeaseLost, StoreError
from declsaga.stores import Claim, Commit, SagaHeader, Store
from declsaga.stores._postgres import PostgresStore, _masked
from declsaga.testing import SharedStoreConformance


class TestPostgresStore(SharedStoreConformance):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with fresh_schema() as schema, PostgresStore(POSTGRES_DSN, schema=schema) as store:
            yield store

    @pytest.fixture
    def second_store(self, store: Store) -> Iterator[Store]:
        assert isinstance(store, PostgresStore)
        with PostgresStore(POSTGRES_DSN, schema=store.schema) as second:
            yield second


# -- helpers -------------------------------------------------------------------------------


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def header(saga_id: str) -> SagaHeader:
    return SagaHeader(saga_id, "tests.Order", "f-1", {"sequence": ["a"]}, None)


def start(store: Store, saga_id: str, *entries: str, status: str | None = None) -> Claim:
    claim = store.claim(saga_id)
    assert claim is not None
    store.append(claim, Commit(0, entries, status, header(saga_id)))
    return claim


def lost(saga_id: str) -> str:
    return exactly(
        f"The lease on saga {saga_id!r} was lost: it expired, and another process may have "
        "taken the saga over. Nothing was written."
    )


def execute(query: sql.Composed | sql.SQL, *params: object) -> list[tuple[Any, ...]]:
    """Run `query` on a connection of its own, committed; its rows, if any."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as connection:
        cursor = connection.execute(query, params or None)
        return cursor.fetchall() if cursor.description else []


def table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def expire(schema: str, saga_id: str) -> None:
    """End a lease now, as if its holder had stopped renewing it long ago."""
    execute(
        sql.SQL("UPDATE {} SET expires = now() - interval '1 second' WHERE saga_id = %s").format(
            table(schema, "claims")
        ),
        saga_id,
    )


def catalog(schema: str) -> list[tuple[str, str]]:
    """What the schema holds: (kind, name) of each relation, sorted."""
    return sorted(
        (str(kind), str(name))
        for kind, name in execute(
            sql.SQL(
                "SELECT c.relkind, c.relname FROM pg_class AS c JOIN pg_namespace AS n "
                "ON n.oid = c.relnamespace WHERE n.nspname = %s"
            ),
            schema,
        )
    )


@pytest.fixture
def schema() -> Iterator[str]:
    with fresh_schema() as name:
        yield name


@pytest.fixture
def store(schema: str) -> Iterator[PostgresStore]:
    with PostgresStore(POSTGRES_DSN, schema=schema, lease=5.0) as store:
        yield store


@pytest.fixture
def other(schema: str, store: PostgresStore) -> Iterator[PostgresStore]:
    """A second store object on the same schema, as another process would have."""
    with PostgresStore(POSTGRES_DSN, schema=schema, lease=5.0) as other:
        yield other


# -- leases --------------------------------------------------------------------------------

CHILD = """
import sys
from declsaga.stores import Commit, SagaHeader
from declsaga.stores._postgres import PostgresStore

store = PostgresStore(sys.argv[1], schema=sys.argv[2], lease=1.0)
claim = store.claim("s-1")
store.append(claim, Commit(0, ("mine",), None, SagaHeader("s-1", "n", "f", None, None)))
print("claimed", flush=True)
sys.stdin.readline()  # paused here (SIGSTOP) while the lease runs out
try:
    store.append(claim, Commit(1, ("stale",), "completed"))
    print("appended", flush=True)
except Exception as error:
    print(type(error).__name__, error, flush=True)
sys.stdin.readline()
"""


def test_an_expired_lease_is_taken_over_and_fences_off_its_holder(
    schema: str, store: PostgresStore
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, POSTGRES_DSN, schema],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline() == "claimed\n"
            time.sleep(1.5)  # beyond the lease: the child's heartbeat renews it
            assert store.claim("s-1") is None
            child.send_signal(signal.SIGSTOP)  # paused: no heartbeat any more
            deadline = time.monotonic() + 5
            while (taken := store.claim("s-1")) is None:
                assert time.monotonic() < deadline, "the lease never expired"
                time.sleep(0.05)
            store.append(taken, Commit(1, ("taken over",)))
            child.send_signal(signal.SIGCONT)
            child.stdin.write("\n")
            child.stdin.flush()
            outcome = child.stdout.readline()
            assert outcome == (
                "LeaseLost The lease on saga 's-1' was lost: it expired, and another process "
                "may have taken the saga over. Nothing was written.\n"
            )
            saga = store.load("s-1")
            assert saga is not None
            assert (saga.entries, saga.status) == (("mine", "taken over"), "running")
            store.append(taken, Commit(2, ("still ours",), "completed"))  # not stolen back
        finally:
            child.send_signal(signal.SIGCONT)
            child.kill()


def test_the_heartbeat_keeps_a_lease_beyond_many_periods(schema: str) -> None:
    with (
        PostgresStore(POSTGRES_DSN, schema=schema, lease=0.4) as store,
        PostgresStore(POSTGRES_DSN, schema=schema, lease=0.4) as other,
    ):
        claim = start(store, "s-1", "a")
        time.sleep(1.6)  # four leases
        assert other.claim("s-1") is None
        assert other.claim_next(5) == []
        store.append(claim, Commit(1, ("b",), "completed"))
        store.release(claim)
        assert other.claim("s-1") is not None


def test_a_lease_lost_to_another_store_refuses_appends(
    schema: str, store: PostgresStore, other: PostgresStore
) -> None:
    claim = start(store, "s-1", "a")
    expire(schema, "s-1")
    taken = other.claim("s-1")
    assert taken is not None
    assert taken.token > claim.token  # the fencing token grows
    with pytest.raises(LeaseLost, match=lost("s-1")):
        store.append(claim, Commit(1, ("stale",), "completed"))
    with pytest.raises(LeaseLost, match=lost("s-1")):  # and again, without the server
        store.append(claim, Commit(1, ("stale",), "completed"))
    saga = store.load("s-1")
    assert saga is not None
    assert (saga.entries, saga.seq, saga.status) == (("a",), 1, "running")
    store.release(claim)  # releases nothing of the new holder's
    assert store.claim("s-1") is None
    other.append(taken, Commit(1, ("b",)))


def test_an_expired_lease_nobody_took_still_refuses_appends(
    schema: str, store: PostgresStore
) -> None:
    claim = start(store, "s-1", "a")
    expire(schema, "s-1")
    with pytest.raises(LeaseLost, match=lost("s-1")):
        store.append(claim, Commit(1, ("late",)))
    store.release(claim)
    again = store.claim("s-1")
    assert again is not None
    store.append(again, Commit(1, ("b",)))


def test_claims_of_one_store_object_are_not_another_s(
    store: PostgresStore, other: PostgresStore
) -> None:
    claim = start(store, "s-1", "a")
    other.release(claim)  # not its claim: nothing happens
    assert other.claim("s-1") is None
    store.append(claim, Commit(1, ("b",)))


def test_claim_next_takes_over_expired_leases(
    schema: str, store: PostgresStore, other: PostgresStore
) -> None:
    start(store, "s-0", "a")
    start(store, "s-1", "a")
    assert other.claim_next(5) == []
    expire(schema, "s-1")
    assert [claim.saga_id for claim in other.claim_next(5)] == ["s-1"]


def test_claim_next_passes_over_a_claim_an_append_is_checking(
    schema: str, store: PostgresStore, other: PostgresStore
) -> None:
    start(store, "s-1", "a")
    expire(schema, "s-1")
    with psycopg.connect(POSTGRES_DSN) as appending:  # holds the row as an append does
        appending.execute(
            sql.SQL("SELECT FROM {} WHERE saga_id = 's-1' FOR SHARE").format(
                table(schema, "claims")
            )
        )
        began = time.monotonic()
        assert other.claim_next(5) == []
        assert time.monotonic() - began < 1  # not waited for
    assert [claim.saga_id for claim in other.claim_next(5)] == ["s-1"]


# -- waiting for a saga to end -------------------------------------------------------------


def test_wait_ended_wakes_when_another_store_ends_the_saga(
    store: PostgresStore, other: PostgresStore
) -> None:
    claim = start(store, "s-1", "a")
    ended = threading.Timer(0.3, store.append, (claim, Commit(1, ("b",), "completed")))
    began = time.monotonic()
    ended.start()
    other.wait_ended("s-1", 10)
    ended.join()
    assert 0.3 <= time.monotonic() - began < 3
    saga = other.load("s-1")
    assert saga is not None and saga.status == "completed"
    began = time.monotonic()
    other.wait_ended("s-1", 10)  # ended already: at once
    assert time.monotonic() - began < 1


def test_wait_ended_times_out_and_ignores_other_sagas(
    store: PostgresStore, other: PostgresStore
) -> None:
    start(store, "s-1", "a")
    claim = start(store, "s-2", "a")
    ended = threading.Timer(0.1, store.append, (claim, Commit(1, (), "compensated")))
    began = time.monotonic()
    ended.start()
    other.wait_ended("s-1", 0.5)
    ended.join()
    assert 0.5 <= time.monotonic() - began < 3
    other.wait_ended("s-1", -1)  # a deadline passed already: no wait
    other.wait_ended("unknown", 0)
    with pytest.raises(
        ValueError, match=exactly("The timeout must be a number of seconds, not nan.")
    ):
        other.wait_ended("s-1", float("nan"))


# -- schemas -------------------------------------------------------------------------------


def test_a_missing_schema_is_created() -> None:
    with fresh_schema(create=False) as schema:
        with PostgresStore(POSTGRES_DSN, schema=schema) as store:
            start(store, "s-1", "a")
        assert ("r", "sagas") in catalog(schema)
        with PostgresStore(POSTGRES_DSN, schema=schema) as store:  # opened again as it is
            assert store.unfinished() == ["s-1"]


def test_processes_opening_one_new_schema_together_migrate_it_once() -> None:
    with fresh_schema(create=False) as schema:
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def open_it() -> None:
            barrier.wait()
            try:
                PostgresStore(POSTGRES_DSN, schema=schema, pool_size=1).close()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert execute(
            sql.SQL("SELECT version FROM {}").format(table(schema, "declsaga_schema"))
        ) == [(3,)]


def refused(schema: str, message: str) -> StoreError:
    """Open `schema`, expect a refusal with `message`, and check that nothing changed."""
    before = catalog(schema)
    with pytest.raises(StoreError, match=exactly(message)) as info:
        PostgresStore(POSTGRES_DSN, schema=schema)
    assert catalog(schema) == before
    return info.value


def test_a_schema_from_a_newer_declsaga_is_refused(schema: str) -> None:
    PostgresStore(POSTGRES_DSN, schema=schema).close()
    versions = table(schema, "declsaga_schema")
    execute(sql.SQL("UPDATE {} SET version = 99").format(versions))
    refused(
        schema,
        f"The schema {schema!r} of {_masked(POSTGRES_DSN)} has schema version 99, from a "
        "newer declsaga; this one knows versions up to 3. It was left unchanged.",
    )
    assert execute(sql.SQL("SELECT version FROM {}").format(versions)) == [(99,)]


def test_a_schema_that_is_not_declsaga_s_is_refused(schema: str) -> None:
    execute(sql.SQL("CREATE TABLE {} (id INTEGER PRIMARY KEY)").format(table(schema, "orders")))
    refused(
        schema,
        f"The schema {schema!r} of {_masked(POSTGRES_DSN)} is not a declsaga schema (it has "
        "no declsaga_schema table); it was left unchanged.",
    )
    assert catalog(schema) == [("i", "orders_pkey"), ("r", "orders")]


# -- the driver boundary -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            "postgresql://someone:s3cret-pw@127.0.0.1:1/orders",
            "postgresql://someone:***@127.0.0.1:1/orders",
        ),
        (
            "host=127.0.0.1 port=1 user=someone password=s3cret-pw dbname=orders",
            "postgresql://someone:***@127.0.0.1:1/orders",
        ),
    ],
)
def test_an_unreachable_server_is_a_store_error_without_the_password(dsn: str, shown: str) -> None:
    began = time.monotonic()
    with pytest.raises(StoreError) as info:
        PostgresStore(dsn, timeout=2)
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert message.startswith(f"The PostgreSQL database {shown} failed while opening it: ")
    assert "127.0.0.1" in message.removeprefix(f"The PostgreSQL database {shown}")
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    for text in (message, repr(info.value)):
        assert "s3cret-pw" not in text


def test_repr_and_messages_mask_the_password(schema: str) -> None:
    # A server that trusts the test's connections accepts a password it does not need.
    secret = str(conninfo_to_dict(POSTGRES_DSN).get("password") or "s3cret-pw")
    dsn = make_conninfo(POSTGRES_DSN, password=secret)
    with PostgresStore(dsn, schema=schema) as store:
        assert repr(store) == f"PostgresStore({store.dsn!r}, schema={schema!r})"
        assert ":***@" in store.dsn
        with pytest.raises(StoreError) as info:
            store.claim("nul \0 in an id")
        assert isinstance(info.value.__cause__, psycopg.DataError)
        assert str(info.value) == (
            f"The PostgreSQL database {store.dsn} failed while claiming saga "
            "'nul \\x00 in an id': PostgreSQL text fields cannot contain NUL (0x00) bytes."
        )
        assert secret not in repr(store)


def test_a_malformed_dsn_is_a_value_error_that_quotes_nothing() -> None:
    with pytest.raises(
        ValueError, match=exactly("The DSN is not a valid PostgreSQL connection string.")
    ):
        PostgresStore("host=x password='s3cret")


def test_a_row_locked_beyond_the_timeout(schema: str) -> None:
    with PostgresStore(POSTGRES_DSN, schema=schema, timeout=0.2) as store:
        claim = start(store, "s-1", "a")
        with psycopg.connect(POSTGRES_DSN) as blocker:
            blocker.execute(sql.SQL("SELECT * FROM {} FOR UPDATE").format(table(schema, "claims")))
            message = (
                f"The PostgreSQL database {store.dsn} kept a row locked beyond the timeout of "
                "0.2s while appending to saga 's-1': another transaction holds it."
            )
            with pytest.raises(StoreError, match=exactly(message)) as info:
                store.append(claim, Commit(1, ("b",)))
            assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
        store.append(claim, Commit(1, ("b",)))


def test_the_store_needs_its_optional_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    message = "PostgresStore needs the optional extra: pip install 'declsaga[postgres]'"
    with pytest.raises(ImportError, match=exactly(message)):
        PostgresStore(POSTGRES_DSN)


def test_importing_the_store_needs_no_driver() -> None:
    code = """
import sys
sys.modules["psycopg"] = sys.modules["psycopg_pool"] = None
import declsaga
from declsaga.stores._postgres import PostgresStore
assert declsaga.PostgresStore is PostgresStore
try:
    PostgresStore("postgresql://nobody@127.0.0.1:1/none")
except ImportError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        done.stdout == "PostgresStore needs the optional extra: pip install 'declsaga[postgres]'\n"
    )


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"dsn": 7}, TypeError, "The DSN of a PostgreSQL store must be a str, not 7."),
        ({"schema": None}, TypeError, "The schema must be a str, not None."),
        (
            {"schema": ""},
            ValueError,
            "The schema must be a name of 1 to 63 bytes without NUL, not ''.",
        ),
        (
            {"schema": "x" * 64},
            ValueError,
            f"The schema must be a name of 1 to 63 bytes without NUL, not {'x' * 64!r}.",
        ),
        (
            {"schema": "a\0b"},
            ValueError,
            "The schema must be a name of 1 to 63 bytes without NUL, not 'a\\x00b'.",
        ),
        ({"lease": "5"}, TypeError, "The lease must be a number of seconds, not '5'."),
        ({"lease": True}, TypeError, "The lease must be a number of seconds, not True."),
        ({"lease": 0}, ValueError, "The lease must be a number of seconds above 0, not 0."),
        (
            {"lease": float("inf")},
            ValueError,
            "The lease must be a number of seconds above 0, not inf.",
        ),
        (
            {"lease": float("nan")},
            ValueError,
            "The lease must be a number of seconds above 0, not nan.",
        ),
        ({"pool_size": 2.0}, TypeError, "The pool size must be an int, not 2.0."),
        ({"pool_size": 0}, ValueError, "The pool size must be at least 1, not 0."),
        (
            {"timeout": -1},
            ValueError,
            "The timeout must be a number of seconds above 0 and at most 2147483, not -1.",
        ),
        (
            {"timeout": 3e6},
            ValueError,
            "The timeout must be a number of seconds above 0 and at most 2147483, not 3000000.0.",
        ),
    ],
)
def test_bad_arguments(options: dict[str, Any], error: type[Exception], message: str) -> None:
    arguments = {"dsn": POSTGRES_DSN, **options}
    with pytest.raises(error, match=exactly(message)):
        PostgresStore(**arguments)


# -- closing and fork ----------------------------------------------------------------------


def test_closing_stops_the_heartbeat_and_releases_every_claim(
    store: PostgresStore, other: PostgresStore
) -> None:
    start(store, "s-1", "a")
    assert store.claim("s-2") is not None
    beating = store._beating
    assert beating is not None and beating.is_alive()
    store.close()
    assert not beating.is_alive()
    assert other.claim("s-1") is not None
    assert other.claim("s-2") is not None
