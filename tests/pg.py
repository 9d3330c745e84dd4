"""PostgreSQL for tests: the server to use, and fresh schemas that are dropped afterwards.

The server is `$DECLSAGA_TEST_POSTGRES`, else a local one. Tests that need it fail (they
never skip) when it cannot be reached: a store that is not tested is not known to work.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from declsaga.stores._postgres import PostgresStore

__all__ = ["POSTGRES_DSN", "drop_schema", "fresh_schema", "postgres_store"]

POSTGRES_DSN = os.environ.get("DECLSAGA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def drop_schema(name: str, dsn: str = POSTGRES_DSN) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@contextmanager
def fresh_schema(*, create: bool = True, dsn: str = POSTGRES_DSN) -> Iterator[str]:
    """The name of a schema nobody uses, `declsaga_test_<hex>`: created empty (or left
    missing, with `create=False`), then dropped with everything in it."""
    name = f"declsaga_test_{secrets.token_hex(8)}"
    if create:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        drop_schema(name, dsn)


@contextmanager
def postgres_store(**options: Any) -> Iterator[PostgresStore]:
    """A store on a fresh schema, closed and dropped afterwards; `options` are the
    store's keywords."""
    with fresh_schema() as schema, PostgresStore(POSTGRES_DSN, schema=schema, **options) as store:
        yield store
