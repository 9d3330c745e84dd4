"""SQLite's SQL: the schema as numbered migrations, and the statements the store runs.

Migration N takes a database to version N. A database records the version it is at in
`declsaga_schema`; opening one applies the migrations it lacks, in one write
transaction. Released migrations are never edited: a change to the schema is a new
migration at the end of the tuple, and the statements below change with it.
"""

from __future__ import annotations

import sqlite3

from declsaga._errors import StoreError

__all__ = [
    "ALL",
    "ALL_JOURNALS",
    "APPEND",
    "CANCELLED",
    "COUNT",
    "CREATE",
    "JOURNALS_WITH_STATUS",
    "LATEST",
    "LOAD",
    "LOAD_JOURNAL",
    "MIGRATIONS",
    "READY",
    "REQUEST_CANCEL",
    "SET_DUE",
    "SET_STATUS",
    "UNFINISHED",
    "WITH_STATUS",
    "migrate",
    "schema_version",
]

_OBJECTS = "SELECT type, name FROM sqlite_master"
_VERSION_TABLE = "declsaga_schema"
_CREATE_VERSION_TABLE = f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version INTEGER NOT NULL)"
_READ_VERSION = f"SELECT max(version) FROM {_VERSION_TABLE}"
_CLEAR_VERSION = f"DELETE FROM {_VERSION_TABLE}"
_WRITE_VERSION = f"INSERT INTO {_VERSION_TABLE} (version) VALUES (?)"

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: sagas and their journals.
    (
        # One row per saga, written with its first commit and touched again only when the
        # status changes, so that a step costs one INSERT into the journal.
        # `updated` is when the status last changed; the time of the last commit is the
        # `at` of the saga's last journal row.
        """
        CREATE TABLE sagas (
            number INTEGER PRIMARY KEY,
            saga_id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            definition TEXT NOT NULL,
            fields TEXT NOT NULL,
            status TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )
        """,
        # unfinished() and sagas(status) read by status, oldest first.
        "CREATE INDEX sagas_by_status ON sagas (status, created)",
        # One row per commit: its entries as one JSON array. Keyed by the saga's number,
        # not its id: numbers grow, so new rows go to the end of the table instead of to
        # a random page (a uuid's), which makes each commit write fewer pages. WITHOUT
        # ROWID keeps a saga's journal in one contiguous range.
        """
        CREATE TABLE journal (
            saga INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            entries TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (saga, seq)
        ) WITHOUT ROWID
        """,
    ),
    # 2: cancel() from any process: a flag that refuses the commits carrying the saga
    # forward (see APPEND).
    ("ALTER TABLE sagas ADD COLUMN cancel INTEGER NOT NULL DEFAULT 0",),
    # 3: a saga waiting for a retry is parked: workers pass it over until `due`.
    ("ALTER TABLE sagas ADD COLUMN due REAL NOT NULL DEFAULT 0",),
)

LATEST = len(MIGRATIONS)

# The hot path: one statement per commit. It inserts only if the saga exists and the
# commit is its next one: a repeat hits the primary key (ignored), a gap finds no
# predecessor, so rowcount 0 means a conflict and nothing was written. Rows are only ever
# appended after their predecessor, so every journal is 0..n-1 and seq == n is checked
# in O(log n).
#
# After cancel() (`cancel` = 1), a commit of a pending or running saga is refused too,
# unless it sets a status of the rollback or completes the saga (?5: UNCANCELLED).
APPEND = """
    INSERT OR IGNORE INTO journal (saga, seq, entries, at)
    SELECT number, ?2, ?3, ?4 FROM sagas WHERE saga_id = ?1
    AND (?2 = 0 OR EXISTS (SELECT 1 FROM journal WHERE saga = sagas.number AND seq = ?2 - 1))
    AND (cancel = 0 OR status NOT IN ('pending', 'running') OR ?5)
"""
# Why an append wrote nothing, when it is not a conflict.
CANCELLED = "SELECT cancel, status FROM sagas WHERE saga_id = ?"
SET_DUE = "UPDATE sagas SET due = ? WHERE saga_id = ?"
READY = """
    SELECT saga_id FROM sagas
    WHERE status IN ('pending', 'running', 'compensating') AND due <= ?
    ORDER BY created, number
"""
REQUEST_CANCEL = """
    UPDATE sagas SET cancel = 1
    WHERE saga_id = ? AND status IN ('pending', 'running', 'compensating')
"""
# Ignored (rowcount 0) when the saga exists: the first commit of a saga made twice.
CREATE = """
    INSERT OR IGNORE INTO sagas
        (saga_id, name, fingerprint, definition, fields, status, created, updated)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
SET_STATUS = "UPDATE sagas SET status = ?, updated = ? WHERE saga_id = ?"
_NUMBER = "(SELECT number FROM sagas WHERE saga_id = ?)"
COUNT = f"SELECT count(*) FROM journal WHERE saga = {_NUMBER}"

_SAGA_COLUMNS = "saga_id, name, fingerprint, definition, fields, status, created"
LOAD = f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE saga_id = ?"
LOAD_JOURNAL = f"SELECT entries, at FROM journal WHERE saga = {_NUMBER} ORDER BY seq"
# The number breaks ties between sagas created within one clock tick: creation order.
UNFINISHED = """
    SELECT saga_id FROM sagas WHERE status IN ('pending', 'running', 'compensating')
    ORDER BY created, number
"""
ALL = f"SELECT {_SAGA_COLUMNS} FROM sagas ORDER BY created, number"
ALL_JOURNALS = """
    SELECT s.saga_id, j.entries, j.at FROM journal AS j JOIN sagas AS s ON s.number = j.saga
    ORDER BY j.saga, j.seq
"""
WITH_STATUS = f"SELECT {_SAGA_COLUMNS} FROM sagas WHERE status = ? ORDER BY created, number"
JOURNALS_WITH_STATUS = """
    SELECT s.saga_id, j.entries, j.at FROM journal AS j JOIN sagas AS s ON s.number = j.saga
    WHERE s.status = ? ORDER BY j.saga, j.seq
"""


def schema_version(connection: sqlite3.Connection, path: str) -> int:
    """The database's schema version, 0 for an empty one, read without writing: a
    StoreError for a database that is not declsaga's or comes from a newer declsaga."""
    objects = connection.execute(_OBJECTS).fetchall()
    if not any(name == _VERSION_TABLE for _, name in objects):
        if objects:
            raise StoreError(
                f"The database {path} is not a declsaga database (it has no "
                f"{_VERSION_TABLE} table); it was left unchanged."
            )
        return 0
    version = connection.execute(_READ_VERSION).fetchone()[0] or 0
    if version > LATEST:
        raise StoreError(
            f"The database {path} has schema version {version}, from a newer declsaga; "
            f"this one knows versions up to {LATEST}. It was left unchanged."
        )
    return int(version)


def migrate(connection: sqlite3.Connection, path: str) -> None:
    """Bring the database to the latest version; call inside a write transaction."""
    # Read again under the write lock: another process may have migrated meanwhile.
    version = schema_version(connection, path)
    connection.execute(_CREATE_VERSION_TABLE)
    for statements in MIGRATIONS[version:]:
        for statement in statements:
            connection.execute(statement)
    connection.execute(_CLEAR_VERSION)
    connection.execute(_WRITE_VERSION, (LATEST,))
