"""Store URLs: `declsaga.stores.from_url` and password masking."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pg import POSTGRES_DSN, fresh_schema

from declsaga import PostgresStore, SQLiteStore, StoreError
from declsaga.stores import from_url
from declsaga.stores._urls import mask


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://app:s3cret@db:5432/shop", "postgresql://app:***@db:5432/shop"),
        ("postgresql://app:p@ss@db/shop?x=1", "postgresql://app:***@db/shop?x=1"),
        ("postgresql://app@db/shop?note=a:b@c", "postgresql://app@db/shop?note=a:b@c"),
        ("postgresql://db/shop", "postgresql://db/shop"),
        ("sqlite:///sagas.db", "sqlite:///sagas.db"),
    ],
)
def test_mask_hides_only_the_password(url: str, masked: str) -> None:
    assert mask(url) == masked


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with from_url("sqlite:///relative.db") as relative:
        assert isinstance(relative, SQLiteStore)
        assert relative.path == "relative.db"
        assert (tmp_path / "relative.db").exists()
    absolute = tmp_path / "sub dir" / "abs.db"
    absolute.parent.mkdir()
    with from_url(f"sqlite:///{absolute}?synchronous=normal&timeout=2.5") as store:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(absolute)
        assert store.pragmas() == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 2500}
    with from_url("sqlite:///sub%20dir/abs.db") as quoted:  # percent-escapes are decoded
        assert isinstance(quoted, SQLiteStore)
        assert quoted.path == "sub dir/abs.db"


def test_postgres_urls_pass_the_store_s_parameters_and_the_rest_to_the_server() -> None:
    with fresh_schema(create=False) as schema:
        url = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}"
        url += f"schema={schema}&lease=7.5&pool_size=2&application_name=declsaga-test"
        with from_url(url) as store:
            assert isinstance(store, PostgresStore)
            assert (store.schema, store.lease) == (schema, 7.5)
            assert store.unfinished() == []


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        (
            "mysql://app@db/shop",
            ValueError,
            "The store URL 'mysql://app@db/shop' names no store: use "
            "sqlite:///path/to/file.db or postgresql://user@host/database.",
        ),
        (
            "sqlite://",
            ValueError,
            "The SQLite URL 'sqlite://' names no file: use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db.",
        ),
        (
            "sqlite://host/file.db",
            ValueError,
            "The SQLite URL 'sqlite://host/file.db' names no file: use "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db.",
        ),
        (
            "sqlite:///x.db?cache=shared",
            ValueError,
            "The SQLite URL 'sqlite:///x.db?cache=shared' has unknown parameters: cache "
            "(known: synchronous, timeout).",
        ),
        (
            "sqlite:///x.db?timeout=soon",
            ValueError,
            "The store URL 'sqlite:///x.db?timeout=soon' gives timeout='soon', which is not "
            "a valid timeout.",
        ),
        (
            "postgresql://app:s3cret@db:port/shop",
            ValueError,
            "Malformed store URL 'postgresql://app:***@db:port/shop': Port could not be cast "
            "to integer value as 'port'.",
        ),
        (
            "postgresql://app:s3cret@db/shop?lease=1&lease=2",
            ValueError,
            "The store URL 'postgresql://app:***@db/shop?lease=1&lease=2' gives lease twice.",
        ),
        (
            "postgresql://app:s3cret@db/shop?pool_size=many",
            ValueError,
            "The store URL 'postgresql://app:***@db/shop?pool_size=many' gives "
            "pool_size='many', which is not a valid pool_size.",
        ),
    ],
)
def test_malformed_urls(url: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=exactly(message)):
        from_url(url)


def test_a_url_is_a_str() -> None:
    with pytest.raises(TypeError, match=exactly("A store URL is a str, not bytes.")):
        from_url(b"sqlite:///x.db")  # type: ignore[arg-type]


def test_an_unreachable_server_never_shows_the_password() -> None:
    with pytest.raises(StoreError) as raised:
        from_url("postgresql://app:s3cret@127.0.0.1:1/shop?schema=x")
    assert "s3cret" not in str(raised.value)
    assert "postgresql://app:***@127.0.0.1:1/shop" in str(raised.value)
