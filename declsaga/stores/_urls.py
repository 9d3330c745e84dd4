"""Stores named by URL, for command lines and configuration files.

    sqlite:///sagas.db                      a file relative to the working directory
    sqlite:////var/lib/app/sagas.db         an absolute path (four slashes)
    sqlite:///sagas.db?synchronous=NORMAL   SQLiteStore's keywords as query parameters
    postgresql://user:secret@host:5432/db?schema=orders&lease=15

In a PostgreSQL URL, the parameters `schema`, `lease` and `pool_size` are
PostgresStore's; every other parameter (sslmode, application_name, ...) goes to the
server. Passwords never appear in errors or reprs: `mask` hides them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from ._postgres import PostgresStore
    from ._sqlite import SQLiteStore

__all__ = ["from_url", "mask"]

# user:password@ in the authority part, up to its last "@" (as urlsplit reads it).
_PASSWORD = re.compile(r"(://[^:/@?#]*):[^/?#]*@")

_SQLITE_OPTIONS: dict[str, Callable[[str], object]] = {"synchronous": str, "timeout": float}
_POSTGRES_OPTIONS: dict[str, Callable[[str], object]] = {
    "schema": str,
    "lease": float,
    "pool_size": int,
}


def mask(url: str) -> str:
    """`url` with its password, if any, replaced by `***`."""
    return _PASSWORD.sub(r"\1:***@", url)


def from_url(url: str) -> SQLiteStore | PostgresStore:
    """The store that `url` names: `sqlite:///path` or `postgresql://...`.

    ValueError for a URL that is malformed or names no store; the store's own errors
    (StoreError for an unreachable server, say) as it raises them."""
    if not isinstance(url, str):
        raise TypeError(f"A store URL is a str, not {type(url).__qualname__}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising ValueError if it is not a number
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as error:
        raise ValueError(f"Malformed store URL {mask(url)!r}: {error}.") from None
    if parts.scheme == "sqlite":
        return _sqlite(url, parts.netloc, parts.path, query)
    if parts.scheme in ("postgresql", "postgres"):
        return _postgres(url, parts, query)
    raise ValueError(
        f"The store URL {mask(url)!r} names no store: use sqlite:///path/to/file.db or "
        "postgresql://user@host/database."
    )


def _options(
    url: str, query: list[tuple[str, str]], known: dict[str, Callable[[str], object]]
) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """Split the query into the store's keywords (converted) and the rest."""
    options: dict[str, object] = {}
    rest = []
    for name, value in query:
        if name not in known:
            rest.append((name, value))
            continue
        if name in options:
            raise ValueError(f"The store URL {mask(url)!r} gives {name} twice.")
        try:
            options[name] = known[name](value)
        except ValueError:
            raise ValueError(
                f"The store URL {mask(url)!r} gives {name}={value!r}, which is not a valid {name}."
            ) from None
    return options, rest


def _sqlite(url: str, host: str, path: str, query: list[tuple[str, str]]) -> SQLiteStore:
    from ._sqlite import SQLiteStore  # noqa: PLC0415 - the stores package imports this

    if host or not path.startswith("/") or len(path) < 2:
        raise ValueError(
            f"The SQLite URL {url!r} names no file: use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db."
        )
    options, rest = _options(url, query, _SQLITE_OPTIONS)
    if rest:
        names = ", ".join(sorted({name for name, _ in rest}))
        raise ValueError(
            f"The SQLite URL {url!r} has unknown parameters: {names} (known: synchronous, timeout)."
        )
    return SQLiteStore(unquote(path[1:]), **options)  # type: ignore[arg-type]


def _postgres(url: str, parts: SplitResult, query: list[tuple[str, str]]) -> PostgresStore:
    from ._postgres import PostgresStore  # noqa: PLC0415 - psycopg is imported only now

    options, rest = _options(url, query, _POSTGRES_OPTIONS)
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    return PostgresStore(dsn, **options)  # type: ignore[arg-type]
