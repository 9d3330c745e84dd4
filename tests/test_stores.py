"""The stores: the conformance suite for each, then what only SQLite has to prove (files,
pragmas, refusals, other processes, fork, group commit)."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from declsaga._errors import StoreError
from declsaga.stores import Claim, Commit, MemoryStore, SagaHeader, SQLiteStore, Store, _sqlite
from declsaga.stores._claims import prepare
from declsaga.testing import SharedStoreConformance, StoreConformance


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with MemoryStore() as store:
            yield store


class TestSQLiteStore(SharedStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        with SQLiteStore(tmp_path / "sagas.db") as store:
            yield store

    @pytest.fixture
    def second_store(self, store: Store) -> Iterator[Store]:
        assert isinstance(store, SQLiteStore)
        with SQLiteStore(store.path) as second:
            yield second


class TestSQLiteInMemory(StoreConformance):
    @pytest.fixture
    def store(self) -> Iterator[Store]:
        with SQLiteStore(":memory:") as store:
            yield store


# -- helpers -------------------------------------------------------------------------------


def header(saga_id: str) -> SagaHeader:
    return SagaHeader(saga_id, "tests.Order", "f-1", {"sequence": ["a"]}, None)


def start(store: Store, saga_id: str, *entries: str) -> Claim:
    claim = store.claim(saga_id)
    assert claim is not None
    store.append(claim, Commit(0, entries, None, header(saga_id)))
    return claim


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "sagas.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(path) as store:
        yield store


def test_importing_declsaga_does_not_import_pytest() -> None:
    code = "import sys, declsaga, declsaga.stores; assert 'pytest' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("synchronous", "level"), [("off", 0), ("Normal", 1), ("FULL", 2), ("extra", 3)]
)
def test_pragmas_are_in_effect_on_the_store_connection(
    path: Path, synchronous: str, level: int
) -> None:
    with SQLiteStore(path, synchronous=synchronous, timeout=2.5) as store:
        assert store.pragmas() == {
            "journal_mode": "wal",
            "synchronous": level,
            "busy_timeout": 2500,
        }


def test_default_pragmas(store: SQLiteStore) -> None:
    assert store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000}
    assert repr(store) == f"SQLiteStore({str(store.path)!r}, synchronous='FULL')"


@pytest.mark.parametrize("synchronous", ["fast", "", "FULL ", 2])
def test_synchronous_must_be_a_known_setting(path: Path, synchronous: object) -> None:
    message = (
        f"^The synchronous setting must be OFF, NORMAL, FULL or EXTRA \\(in any case\\), "
        f"not {re.escape(repr(synchronous))}\\.$"
    )
    with pytest.raises(ValueError, match=message):
        SQLiteStore(path, synchronous=synchronous)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), True, "5", 3e6])
def test_timeout_must_be_a_positive_number(path: Path, timeout: object) -> None:
    message = (
        f"^The busy timeout must be a number of seconds above 0 and at most 2147483, "
        f"not {re.escape(repr(timeout))}\\.$"
    )
    with pytest.raises(ValueError, match=message):
        SQLiteStore(path, timeout=timeout)  # type: ignore[arg-type]


def test_wal_and_claims_side_files(path: Path, store: SQLiteStore) -> None:
    claim = start(store, "s-1", "a")
    assert Path(f"{path}-wal").exists()
    assert Path(f"{path}-shm").exists()
    assert Path(f"{path}-claims").exists()  # the locks live there, never in the database
    store.release(claim)


def test_reading_does_not_create_the_claims_file(path: Path, store: SQLiteStore) -> None:
    assert store.load("s-1") is None
    assert not Path(f"{path}-claims").exists()


def test_memory_path_has_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with SQLiteStore(":memory:") as store:
        start(store, "s-1", "a")
        assert store.pragmas()["journal_mode"] == "memory"
    assert list(tmp_path.iterdir()) == []


# -- refusals ------------------------------------------------------------------------------


def refused(path: Path, message: str) -> StoreError:
    """Open `path`, expect a refusal with `message`, and check that no byte changed."""
    before = path.read_bytes()
    siblings = sorted(path.parent.iterdir())
    with pytest.raises(StoreError, match=f"^{re.escape(message)}$") as info:
        SQLiteStore(path)
    assert path.read_bytes() == before
    assert sorted(path.parent.iterdir()) == siblings
    return info.value


def test_a_file_that_is_not_sqlite_is_refused(path: Path) -> None:
    path.write_bytes(b"order ledger, not a database\n" * 200)
    error = refused(path, f"The file {path} is not a SQLite database; it was left unchanged.")
    assert isinstance(error.__cause__, sqlite3.DatabaseError)


def test_a_foreign_sqlite_database_is_refused(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    connection.commit()
    connection.close()
    refused(
        path,
        f"The database {path} is not a declsaga database (it has no declsaga_schema table); "
        "it was left unchanged.",
    )
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert connection.execute("SELECT name FROM sqlite_master").fetchall() == [("orders",)]
    connection.close()


def test_a_database_from_a_newer_declsaga_is_refused(path: Path) -> None:
    SQLiteStore(path).close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE declsaga_schema SET version = 99")
    connection.commit()
    connection.close()
    refused(
        path,
        f"The database {path} has schema version 99, from a newer declsaga; this one "
        "knows versions up to 3. It was left unchanged.",
    )


def test_an_empty_file_becomes_a_database(path: Path) -> None:
    path.touch()
    with SQLiteStore(path) as store:
        start(store, "s-1", "a")
    with SQLiteStore(path) as store:
        saga = store.load("s-1")
        assert saga is not None
        assert saga.entries == ("a",)


def test_a_half_created_schema_is_completed(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE declsaga_schema (version INTEGER NOT NULL)")
    connection.execute("INSERT INTO declsaga_schema VALUES (0)")
    connection.commit()
    connection.close()
    with SQLiteStore(path) as store:
        start(store, "s-1", "a")
        assert store.unfinished() == ["s-1"]


# -- locks held by other connections -------------------------------------------------------


def test_a_database_locked_beyond_the_timeout(path: Path) -> None:
    with SQLiteStore(path, timeout=0.2) as store:
        claim = start(store, "s-1", "a")
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            began = time.monotonic()
            message = (
                f"The database {path} stayed locked beyond the busy timeout of 0.2s while "
                "appending: another connection holds a write transaction."
            )
            with pytest.raises(StoreError, match=f"^{re.escape(message)}$") as info:
                store.append(claim, Commit(1, ("b",), "completed"))
            assert time.monotonic() - began >= 0.2
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            # WAL: readers are not blocked, and an up-to-date file opens without writing.
            with SQLiteStore(path, timeout=0.2) as other:
                assert other.unfinished() == ["s-1"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        store.append(claim, Commit(1, ("b",), "completed"))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.entries, saga.status) == (("a", "b"), "completed")


def test_opening_a_new_file_waits_for_other_connections(path: Path) -> None:
    # The switch to WAL needs the new file to itself.
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM sqlite_master").fetchall()
        message = (
            f"The database {path} stayed locked beyond the busy timeout of 0.1s while "
            "opening it: another connection holds a write transaction."
        )
        with pytest.raises(StoreError, match=f"^{re.escape(message)}$"):
            SQLiteStore(path, timeout=0.1)
        timer = threading.Timer(0.1, reader.execute, ("COMMIT",))
        timer.start()
        began = time.monotonic()
        with SQLiteStore(path, timeout=5) as store:
            assert time.monotonic() - began >= 0.1
            assert store.pragmas()["journal_mode"] == "wal"
        timer.join()
    finally:
        reader.close()


class Busy:
    """A connection whose switch to WAL is refused `times` times, as by SQLite when two
    connections switch a new file at once (SQLITE_BUSY without the busy handler)."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.calls = 0

    def execute(self, sql: str) -> Busy:
        assert sql == "PRAGMA journal_mode = WAL"
        self.calls += 1
        if self.calls <= self.times:
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorname = "SQLITE_BUSY"
            raise error
        return self

    def fetchone(self) -> tuple[str]:
        return ("wal",)


def test_the_switch_to_wal_is_retried_until_the_timeout(path: Path) -> None:
    with SQLiteStore(path, timeout=0.2) as store:
        busy = Busy(3)
        assert store._switch_to_wal(busy) == "wal"  # type: ignore[arg-type]
        assert busy.calls == 4
        began = time.monotonic()
        with pytest.raises(sqlite3.OperationalError):
            store._switch_to_wal(Busy(1000))  # type: ignore[arg-type]
        assert 0.2 <= time.monotonic() - began < 1


# -- other processes -----------------------------------------------------------------------

CHILD = """
import sys
from declsaga.stores import Commit, SagaHeader, SQLiteStore

store = SQLiteStore(sys.argv[1])
claim = store.claim(sys.argv[2])
print("claimed" if claim else "busy", flush=True)
if claim is not None and len(sys.argv) > 3:
    store.append(claim, Commit(0, (), None, SagaHeader(claim.saga_id, "n", "f", None, None)))
    for seq in range(1, int(sys.argv[3])):
        store.append(claim, Commit(seq, (seq,)))
    print("appended", flush=True)
sys.stdin.read()  # hold the claim until killed or told to end
"""


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_live_process_keeps_its_claim_until_it_is_killed(path: Path, store: SQLiteStore) -> None:
    with child(str(path), "s-1") as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "claimed\n"
        for _ in range(3):
            assert store.claim("s-1") is None
            time.sleep(0.01)
        other = store.claim("s-2")
        assert other is not None  # the child holds one saga, not the file
        process.kill()  # SIGKILL: no cleanup runs in the child
        process.wait()
    assert store.claim("s-1") is not None  # at once: the kernel dropped the lock


def test_a_process_cannot_take_a_claim_held_here(path: Path, store: SQLiteStore) -> None:
    claim = store.claim("s-1")
    assert claim is not None
    with child(str(path), "s-1") as process:
        stdout, _ = process.communicate("")
    assert stdout == "busy\n"
    store.release(claim)
    with child(str(path), "s-1") as process:
        stdout, _ = process.communicate("")
    assert stdout == "claimed\n"


def test_closing_one_store_keeps_the_claims_of_another(path: Path) -> None:
    # Both share the process's one descriptor of the claims file: closing a descriptor
    # would drop every lock of the process on that file.
    with SQLiteStore(path) as first, SQLiteStore(path) as second:
        assert first.claim("s-1") is not None
        assert second.claim("s-2") is not None
        first.close()
        for saga_id, expected in [("s-1", "claimed\n"), ("s-2", "busy\n")]:
            with child(str(path), saga_id) as process:
                stdout, _ = process.communicate("")
            assert stdout == expected
        assert second.claim("s-1") is not None


def test_two_processes_append_to_one_file(path: Path, store: SQLiteStore) -> None:
    with child(str(path), "theirs", "50") as process:
        claim = start(store, "ours")
        for seq in range(1, 50):
            store.append(claim, Commit(seq, (str(seq),)))
        stdout, _ = process.communicate("")
        assert process.returncode == 0
    assert stdout == "claimed\nappended\n"
    theirs = store.load("theirs")
    assert theirs is not None
    assert theirs.entries == tuple(range(1, 50))
    assert sorted(store.unfinished()) == ["ours", "theirs"]


RACER = """
import os, sys, time
from declsaga.stores import Commit, SagaHeader, SQLiteStore

path, go, name = sys.argv[1:]
while not os.path.exists(go):  # the start line
    time.sleep(0.0001)
for n in range(10):  # open and close again and again: closing checkpoints the WAL
    with SQLiteStore(path) as store:
        claim = store.claim(f"{name}-{n}")
        store.append(claim, Commit(0, (), None, SagaHeader(claim.saga_id, "n", "f", None, None)))
"""


def test_processes_opening_and_closing_one_new_file_at_once(path: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(path), str(go), f"p{n}"])
        for n in range(6)
    ]
    time.sleep(0.3)  # let them all reach the start line
    go.touch()
    for racer in racers:
        assert racer.wait() == 0
    with SQLiteStore(path) as store:
        assert len(store.unfinished()) == 60


# -- group commit --------------------------------------------------------------------------


def appending_together(
    store: SQLiteStore, appends: list[tuple[Claim, Commit]], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[int]]:
    """Queue every append while the connection is taken, so that one thread commits them
    all in one transaction; each append's outcome ("ok" or its error message), and the
    sizes of the transactions tried."""
    outcomes = [""] * len(appends)
    sizes: list[int] = []
    apply = store._apply

    def spy(batch: list[Any]) -> list[StoreError | None]:
        sizes.append(len(batch))
        return apply(batch)

    monkeypatch.setattr(store, "_apply", spy)

    def append(index: int, claim: Claim, commit: Commit) -> None:
        try:
            store.append(claim, commit)
            outcomes[index] = "ok"
        except StoreError as error:
            outcomes[index] = str(error)

    threads = [
        threading.Thread(target=append, args=(index, *pair)) for index, pair in enumerate(appends)
    ]
    with store._lock:
        for thread in threads:
            thread.start()
        while len(store._queue) < len(appends):
            time.sleep(0.001)
    for thread in threads:
        thread.join()
    return outcomes, sizes


def test_a_conflict_in_a_shared_transaction_fails_only_its_append(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = [start(store, f"s-{n}", "a") for n in range(4)]
    appends = [(claim, Commit(1, ("b",))) for claim in claims]
    appends.insert(1, (claims[0], Commit(5, ("gap",))))
    appends.append((claims[3], Commit(1, ("repeat",))))
    outcomes, sizes = appending_together(store, appends, monkeypatch)
    assert sizes == [6]  # a conflict writes nothing, so the others commit together
    assert outcomes == [
        "ok",
        "Journal conflict for saga 's-0': commit 5 was appended, but the journal holds 2 commits.",
        "ok",
        "ok",
        "ok",
        "Journal conflict for saga 's-3': commit 1 was appended, but the journal holds 2 commits.",
    ]
    for n in range(4):
        saga = store.load(f"s-{n}")
        assert saga is not None
        assert saga.entries == ("a", "b")


def test_a_driver_error_in_a_shared_transaction_fails_only_its_append(
    path: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trigger that refuses one journal row breaks the shared transaction it is in.
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON journal WHEN NEW.entries LIKE '%boom%' "
        "BEGIN SELECT RAISE(ABORT, 'boom refused'); END"
    )
    connection.commit()
    connection.close()
    claims = [start(store, f"s-{n}", "a") for n in range(4)]
    appends = [(claim, Commit(1, ("b",), "completed")) for claim in claims]
    appends[1] = (claims[1], Commit(1, ("boom",), "completed"))
    outcomes, sizes = appending_together(store, appends, monkeypatch)
    assert sizes == [4, 1, 1, 1, 1]  # rolled back, then one by one
    assert outcomes == [
        "ok",
        f"The database {path} failed while appending: boom refused.",
        "ok",
        "ok",
    ]
    assert [saga.header.saga_id for saga in store.sagas("completed")] == ["s-0", "s-2", "s-3"]
    assert store.unfinished() == ["s-1"]
    loaded = store.load("s-1")
    assert loaded is not None and loaded.seq == 1  # the refused commit left nothing


def test_an_interrupted_follower_withdraws_its_append(store: SQLiteStore) -> None:
    leaders_claim, followers_claim = start(store, "s-0", "a"), start(store, "s-1", "a")
    leader = threading.Thread(target=store.append, args=(leaders_claim, Commit(1, ("b",))))
    # Ctrl-C as a signal of our own: SIGINT may be ignored (a background job inherits that).
    previous = signal.signal(signal.SIGUSR1, signal.default_int_handler)
    try:
        with store._lock:  # the leader will wait for the connection, holding the lead
            leader.start()
            while not store._leading:
                time.sleep(0.001)
            main = threading.main_thread().ident
            assert main is not None
            timer = threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGUSR1))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                store.append(followers_claim, Commit(1, ("withdrawn",)))
            timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    leader.join()
    assert [saga.seq for saga in store.sagas()] == [2, 1]
    store.append(followers_claim, Commit(1, ("b",)))  # the lead was not lost
    assert [saga.seq for saga in store.sagas()] == [2, 2]


def test_a_withdrawn_successor_passes_the_lead_on(store: SQLiteStore) -> None:
    claim = start(store, "s-0", "a")
    wakes = [threading.Event(), threading.Event()]
    prepared = [_sqlite._Waiter(prepare(store._claims, claim, Commit(n, ()))) for n in (1, 2)]
    for waiter, wake in zip(prepared, wakes, strict=True):
        waiter.wake = wake
    store._queue, store._leading = list(prepared), True
    wakes[0].set()  # the lead was handed to it as it was interrupted
    store._withdraw(prepared[0])
    assert store._queue == [prepared[1]]
    assert wakes[1].is_set()
    store._queue, store._leading = [], False


def test_a_version_1_database_is_migrated_and_keeps_its_sagas(path: Path) -> None:
    from declsaga.stores import _migrations  # noqa: PLC0415 - what a version-1 file held

    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("CREATE TABLE declsaga_schema (version INTEGER NOT NULL)")
    for statement in _migrations.MIGRATIONS[0]:
        connection.execute(statement)
    connection.execute("INSERT INTO declsaga_schema (version) VALUES (1)")
    connection.execute(
        "INSERT INTO sagas (saga_id, name, fingerprint, definition, fields, status, created, "
        "updated) VALUES ('old', 'n', 'f', '{}', 'null', 'running', 1.0, 1.0)"
    )
    connection.execute("INSERT INTO journal VALUES (1, 0, '[\"started\"]', 1.0)")
    connection.execute("COMMIT")
    connection.close()
    with SQLiteStore(path) as store:
        saga = store.load("old")
        assert saga is not None and (saga.status, saga.entries) == ("running", ("started",))
        assert store.request_cancel("old") is True  # the column migration 2 adds
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT version FROM declsaga_schema").fetchall() == [(3,)]
    connection.close()
