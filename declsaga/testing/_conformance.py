"""The `Store` contract as tests: `StoreConformance`, and `SharedStoreConformance` for
stores whose objects share their data."""

from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Any

import pytest

from declsaga._errors import CancelRequested, StoreError
from declsaga.stores._base import JSON, Claim, Commit, SagaHeader, Store

__all__ = ["SharedStoreConformance", "StoreConformance"]


def _header(saga_id: str) -> SagaHeader:
    return SagaHeader(
        saga_id,
        name="tests.PlaceOrder",
        fingerprint="f-1",
        definition={"sequence": ["reserve", "charge"], "compensators": {"reserve": "free"}},
        fields={"order_id": saga_id, "amount": 30},
    )


def _start(
    store: Store, saga_id: str, entries: tuple[JSON, ...] = ("started",), status: str | None = None
) -> Claim:
    """Claim `saga_id` and create it with its first commit."""
    claim = store.claim(saga_id)
    assert claim is not None
    store.append(claim, Commit(0, entries, status, _header(saga_id)))
    return claim


def _exactly(message: str) -> str:
    """A `match=` pattern for exactly `message`."""
    return f"^{re.escape(message)}$"


def _conflict(saga_id: str, seq: int, commits: int) -> str:
    return _exactly(
        f"Journal conflict for saga {saga_id!r}: commit {seq} was appended, but the journal "
        f"holds {commits} commits."
    )


def _race_for_sagas(store: Store, sources: list[Store], sagas: int = 60) -> None:
    """Threads taking pending sagas with `claim_next` from `sources` at once: each saga
    goes to exactly one of them."""
    for i in range(sagas):
        store.release(_start(store, f"s-{i}", (), "pending"))
    taken: list[list[str]] = [[] for _ in sources]
    barrier = threading.Barrier(len(sources))

    def take(source: Store, mine: list[str]) -> None:
        barrier.wait()
        while claims := source.claim_next(3):
            mine.extend(claim.saga_id for claim in claims)

    workers = [
        threading.Thread(target=take, args=(source, mine))
        for source, mine in zip(sources, taken, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    everything = [saga_id for mine in taken for saga_id in mine]
    assert sorted(everything) == sorted(f"s-{i}" for i in range(sagas))
    assert all(source.claim_next(5) == [] for source in sources)  # every one is held


def _bad_limit(limit: object) -> str:
    return f"claim_next takes a limit of at least 1, got {limit!r}."


def _not_claimed(saga_id: str) -> str:
    return _exactly(
        f"Saga {saga_id!r} is not claimed by this store; claim it before appending to it."
    )


_FIRST_ONLY = "the first commit (seq 0), and only it, carries the saga's header."
_UNKNOWN_STATUS = (
    "Unknown saga status 'done'; use one of pending, running, compensating, completed, "
    "compensated, failed, resolved."
)


class StoreConformance:
    """The `Store` contract as tests. Subclasses provide the `store` fixture."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("A StoreConformance subclass provides the store fixture.")

    def test_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)

    # -- appending and loading ------------------------------------------------------------

    def test_first_commit_creates_the_saga(self, store: Store) -> None:
        before = time.time()
        _start(store, "s-1", ({"kind": "saga_started"}, {"kind": "run_started", "run": 0}))
        after = time.time()
        saga = store.load("s-1")
        assert saga is not None
        assert saga.header == _header("s-1")
        assert saga.status == "running"
        assert saga.entries == ({"kind": "saga_started"}, {"kind": "run_started", "run": 0})
        assert saga.seq == 1
        assert before <= saga.created == saga.updated <= after

    def test_commits_keep_their_order_and_change_the_status(self, store: Store) -> None:
        claim = _start(store, "s-1", ("a", "b"))
        store.append(claim, Commit(1, ("c",)))
        store.append(claim, Commit(2, ("d", "e"), "compensating"))
        middle = time.time()
        store.append(claim, Commit(3, (), None))  # nothing to add: allowed
        store.append(claim, Commit(4, ("f",), "compensated"))
        after = time.time()
        saga = store.load("s-1")
        assert saga is not None
        assert saga.entries == ("a", "b", "c", "d", "e", "f")
        assert (saga.seq, saga.status) == (5, "compensated")
        assert saga.created <= middle <= saga.updated <= after

    def test_the_first_commit_may_set_the_status(self, store: Store) -> None:
        _start(store, "s-1", status="completed")
        saga = store.load("s-1")
        assert saga is not None
        assert saga.status == "completed"

    def test_values_come_back_as_json(self, store: Store) -> None:
        entry = {
            "tuple": (1, 2),
            "keys": {1: "one"},
            "big": 2**100,
            "float": 0.1,
            "specials": [math.inf, -math.inf],
            "scalars": [True, False, None, "", -0.5],
            "nested": {"a": [{"b": [[]]}]},
        }
        _start(store, "s-1", (entry,))
        saga = store.load("s-1")
        assert saga is not None
        assert saga.entries == (
            {
                "tuple": [1, 2],
                "keys": {"1": "one"},
                "big": 2**100,
                "float": 0.1,
                "specials": [math.inf, -math.inf],
                "scalars": [True, False, None, "", -0.5],
                "nested": {"a": [{"b": [[]]}]},
            },
        )

    def test_nan_is_kept(self, store: Store) -> None:
        _start(store, "s-1", (math.nan,))
        saga = store.load("s-1")
        assert saga is not None
        assert math.isnan(saga.entries[0])

    def test_entries_are_copied_in_and_out(self, store: Store) -> None:
        entry: dict[str, JSON] = {"items": [1]}
        _start(store, "s-1", (entry,))
        entry["items"].append(2)
        loaded = store.load("s-1")
        assert loaded is not None
        assert loaded.entries == ({"items": [1]},)
        loaded.entries[0]["items"].append(3)
        again = store.load("s-1")
        assert again is not None
        assert again.entries == ({"items": [1]},)

    def test_big_and_unicode_entries(self, store: Store) -> None:
        big = "x" * 1_000_000
        text = "saga 🧾 ünïcode ✓ 注文 \u0000 \ud800"  # NUL and a lone surrogate too
        claim = _start(store, "s-1", (big,))
        store.append(claim, Commit(1, ({"text": text, "é" * 500_000: ["ß"] * 1000},)))
        saga = store.load("s-1")
        assert saga is not None
        assert saga.entries == (big, {"text": text, "é" * 500_000: ["ß"] * 1000})

    def test_unicode_ids_and_header(self, store: Store) -> None:
        header = SagaHeader("заказ-🧾", "名前", "指纹", {"définition": "é"}, ["ü"])
        claim = store.claim(header.saga_id)
        assert claim is not None
        store.append(claim, Commit(0, (), None, header))
        saga = store.load(header.saga_id)
        assert saga is not None
        assert saga.header == header

    def test_loading_an_unknown_saga_gives_none(self, store: Store) -> None:
        assert store.load("nobody") is None
        assert store.unfinished() == []
        assert store.sagas() == []

    # -- refused appends ------------------------------------------------------------------

    def test_a_repeated_seq_is_a_conflict(self, store: Store) -> None:
        claim = _start(store, "s-1", ("a",))
        store.append(claim, Commit(1, ("b",)))
        with pytest.raises(StoreError, match=_conflict("s-1", 1, 2)):
            store.append(claim, Commit(1, ("again",), "completed"))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.entries, saga.seq, saga.status) == (("a", "b"), 2, "running")

    def test_a_gap_is_a_conflict(self, store: Store) -> None:
        claim = _start(store, "s-1", ("a",))
        with pytest.raises(StoreError, match=_conflict("s-1", 2, 1)):
            store.append(claim, Commit(2, ("skipped one",), "completed"))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.entries, saga.seq, saga.status) == (("a",), 1, "running")
        store.append(claim, Commit(1, ("b",)))  # the right seq still works

    def test_creating_a_saga_twice_is_a_conflict(self, store: Store) -> None:
        claim = _start(store, "s-1", ("a",))
        with pytest.raises(StoreError, match=_conflict("s-1", 0, 1)):
            store.append(claim, Commit(0, ("b",), "completed", _header("s-1")))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.entries, saga.status) == (("a",), "running")

    def test_appending_to_a_saga_that_does_not_exist_is_a_conflict(self, store: Store) -> None:
        claim = store.claim("s-1")
        assert claim is not None
        with pytest.raises(StoreError, match=_conflict("s-1", 1, 0)):
            store.append(claim, Commit(1, ("a",)))
        assert store.load("s-1") is None

    @pytest.mark.parametrize(
        ("commit", "message"),
        [
            (Commit(0, ()), f"Commit 0 of saga 's-1': {_FIRST_ONLY}"),
            (Commit(1, (), None, _header("s-1")), f"Commit 1 of saga 's-1': {_FIRST_ONLY}"),
            (
                Commit(0, (), None, _header("s-2")),
                "The header of saga 's-2' was appended under the claim of saga 's-1'.",
            ),
            (Commit(0, (), "done", _header("s-1")), _UNKNOWN_STATUS),
            (Commit(-1, ()), "A commit's seq must be an int from 0 to 2**63 - 1, got -1."),
            (Commit(2**63, ()), f"A commit's seq must be an int from 0 to 2**63 - 1, got {2**63}."),
            (Commit(True, ()), "A commit's seq must be an int from 0 to 2**63 - 1, got True."),
        ],
    )
    def test_malformed_commits_are_value_errors(
        self, store: Store, commit: Commit, message: str
    ) -> None:
        claim = store.claim("s-1")
        assert claim is not None
        with pytest.raises(ValueError, match=_exactly(message)):
            store.append(claim, commit)
        assert store.load("s-1") is None

    def test_appending_without_the_claim(self, store: Store) -> None:
        with pytest.raises(StoreError, match=_not_claimed("s-1")):
            store.append(Claim("s-1"), Commit(0, ("a",), None, _header("s-1")))
        assert store.load("s-1") is None

    def test_appending_after_release(self, store: Store) -> None:
        claim = _start(store, "s-1")
        store.release(claim)
        with pytest.raises(StoreError, match=_not_claimed("s-1")):
            store.append(claim, Commit(1, ("a",)))
        saga = store.load("s-1")
        assert saga is not None
        assert saga.seq == 1

    def test_a_stale_claim_stays_stale_after_a_new_claim(self, store: Store) -> None:
        old = _start(store, "s-1")
        store.release(old)
        new = store.claim("s-1")
        assert new is not None
        with pytest.raises(StoreError, match=_not_claimed("s-1")):
            store.append(old, Commit(1, ("old",)))
        store.append(new, Commit(1, ("new",)))

    def test_a_claim_is_for_its_own_saga(self, store: Store) -> None:
        claim = _start(store, "s-1")
        with pytest.raises(StoreError, match=_not_claimed("s-2")):
            store.append(Claim("s-2", claim.token), Commit(0, (), None, _header("s-2")))

    # -- claims ---------------------------------------------------------------------------

    def test_a_claim_is_exclusive(self, store: Store) -> None:
        claim = store.claim("s-1")  # the saga need not exist yet
        assert claim is not None
        assert claim.saga_id == "s-1"
        assert store.claim("s-1") is None
        other = store.claim("s-2")  # other sagas are free
        assert other is not None
        assert other.saga_id == "s-2"

    def test_a_claim_is_exclusive_across_threads(self, store: Store) -> None:
        barrier = threading.Barrier(16)
        won: list[Claim] = []

        def race() -> None:
            barrier.wait()
            claim = store.claim("s-1")
            if claim is not None:
                won.append(claim)

        threads = [threading.Thread(target=race) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1
        seen: list[Claim | None] = []
        thread = threading.Thread(target=lambda: seen.append(store.claim("s-1")))
        thread.start()
        thread.join()
        assert seen == [None]

    def test_a_saga_id_is_a_str(self, store: Store) -> None:
        with pytest.raises(TypeError, match=_exactly("A saga id is a str, not 7 (int).")):
            store.claim(7)  # type: ignore[arg-type]

    def test_release_then_claim_again(self, store: Store) -> None:
        claim = store.claim("s-1")
        assert claim is not None
        store.release(claim)
        store.release(claim)  # harmless
        again = store.claim("s-1")
        assert again is not None
        store.release(claim)  # a stale claim does not release the new one
        assert store.claim("s-1") is None

    # -- listing --------------------------------------------------------------------------

    def test_unfinished_lists_pending_running_and_compensating_oldest_first(
        self, store: Store
    ) -> None:
        statuses = ["running", "completed", "compensating", "failed", "pending", "compensated"]
        claims = [_start(store, f"s-{i}", status=status) for i, status in enumerate(statuses)]
        assert store.unfinished() == ["s-0", "s-2", "s-4"]
        store.append(claims[2], Commit(1, (), "compensated"))
        store.append(claims[4], Commit(1, ("started",), "running"))
        assert store.unfinished() == ["s-0", "s-4"]

    def test_a_submitted_saga_is_pending_until_started(self, store: Store) -> None:
        claim = _start(store, "s-1", entries=(), status="pending")
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.status, saga.entries, saga.seq) == ("pending", (), 1)
        assert saga.header == _header("s-1")
        store.append(claim, Commit(1, ("started",), "running"))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.status, saga.entries, saga.seq) == ("running", ("started",), 2)

    # -- cancel ----------------------------------------------------------------------------

    def test_cancel_is_asked_of_unfinished_sagas_only(self, store: Store) -> None:
        assert store.request_cancel("nobody") is False
        store.append(_start(store, "done"), Commit(1, ("end",), "completed"))
        assert store.request_cancel("done") is False
        _start(store, "s-1")
        assert store.request_cancel("s-1") is True
        assert store.request_cancel("s-1") is True  # asking twice is harmless

    def test_after_cancel_only_the_rollback_is_committed(self, store: Store) -> None:
        claim = _start(store, "s-1")
        assert store.request_cancel("s-1")
        with pytest.raises(
            CancelRequested, match=_exactly("Saga 's-1' was asked to cancel; it must roll back.")
        ):
            store.append(claim, Commit(1, ("step 2 started",)))
        with pytest.raises(StoreError, match=_conflict("s-1", 2, 1)):
            store.append(claim, Commit(2, ("a gap",)))  # a conflict is still one
        saga = store.load("s-1")
        assert saga is not None and (saga.seq, saga.entries) == (1, ("started",))
        store.append(claim, Commit(1, ("rollback",), "compensating"))
        store.append(claim, Commit(2, ("undone",)))  # compensating: it goes on
        store.append(claim, Commit(3, ("end",), "compensated"))
        saga = store.load("s-1")
        assert saga is not None
        assert (saga.status, saga.entries) == (
            "compensated",
            ("started", "rollback", "undone", "end"),
        )

    def test_a_cancelled_pending_saga_never_starts(self, store: Store) -> None:
        claim = _start(store, "s-1", entries=(), status="pending")
        assert store.request_cancel("s-1")
        with pytest.raises(CancelRequested):
            store.append(claim, Commit(1, ("started",), "running"))
        store.append(claim, Commit(1, ("started", "ended"), "compensated"))
        saga = store.load("s-1")
        assert saga is not None and saga.status == "compensated"

    def test_a_saga_whose_last_step_finished_completes_despite_cancel(self, store: Store) -> None:
        claim = _start(store, "s-1")
        assert store.request_cancel("s-1")
        store.append(claim, Commit(1, ("last step done", "ended"), "completed"))
        saga = store.load("s-1")
        assert saga is not None and saga.status == "completed"

    # -- claiming the next saga -------------------------------------------------------------

    def _unfinished_and_released(self, store: Store, statuses: list[str]) -> None:
        for i, status in enumerate(statuses):
            store.release(_start(store, f"s-{i}", status=status))

    def test_claim_next_takes_unfinished_sagas_oldest_first(self, store: Store) -> None:
        self._unfinished_and_released(
            store, ["running", "completed", "pending", "failed", "compensating", "compensated"]
        )
        first = store.claim_next(2)
        assert [claim.saga_id for claim in first] == ["s-0", "s-2"]
        assert [claim.saga_id for claim in store.claim_next(5)] == ["s-4"]
        assert store.claim_next(1) == []
        for claim in first:  # they are real claims: held, then free again once released
            assert store.claim(claim.saga_id) is None
            store.append(claim, Commit(1, ("resumed",)))
            store.release(claim)
        assert [claim.saga_id for claim in store.claim_next(3)] == ["s-0", "s-2"]

    def test_claim_next_passes_over_a_parked_saga_until_it_is_due(self, store: Store) -> None:
        claim = _start(store, "s-0")
        store.append(claim, Commit(1, ("attempt 1 failed",), due=time.time() + 0.5))
        store.release(claim)
        store.release(_start(store, "s-1"))
        assert [claim.saga_id for claim in store.claim_next(5)] == ["s-1"]
        assert store.unfinished() == ["s-0", "s-1"]  # parked is still unfinished
        deadline = time.monotonic() + 10
        taken: list[Claim] = []
        while not taken and time.monotonic() < deadline:
            time.sleep(0.05)
            taken = store.claim_next(5)
        assert [claim.saga_id for claim in taken] == ["s-0"]
        store.append(taken[0], Commit(2, ("attempt 2",)))  # no due: it stays due

    @pytest.mark.parametrize("due", [math.inf, math.nan, "soon", True])
    def test_a_due_time_is_finite_epoch_seconds(self, store: Store, due: Any) -> None:
        claim = _start(store, "s-0")
        with pytest.raises(
            ValueError,
            match=_exactly(f"A commit's due time must be finite epoch seconds, got {due!r}."),
        ):
            store.append(claim, Commit(1, ("x",), due=due))

    def test_claim_next_skips_held_sagas(self, store: Store) -> None:
        held = _start(store, "s-0")
        self._unfinished_and_released(store, [])
        store.release(_start(store, "s-1", status="pending"))
        assert [claim.saga_id for claim in store.claim_next(2)] == ["s-1"]
        store.release(held)
        assert [claim.saga_id for claim in store.claim_next(2)] == ["s-0"]

    @pytest.mark.parametrize("limit", [0, -1, 1.5, "2", True])
    def test_claim_next_refuses_a_bad_limit(self, store: Store, limit: Any) -> None:
        with pytest.raises(ValueError, match=_exactly(_bad_limit(limit))):
            store.claim_next(limit)

    def test_concurrent_claim_next_never_gives_one_saga_twice(self, store: Store) -> None:
        _race_for_sagas(store, [store] * 4)

    def test_sagas_lists_oldest_first_and_filters_by_status(self, store: Store) -> None:
        statuses = ["running", "completed", "compensating", "completed"]
        for i, status in enumerate(statuses):
            _start(store, f"s-{i}", (f"entry {i}",), status)
        everything = store.sagas()
        assert [saga.header.saga_id for saga in everything] == ["s-0", "s-1", "s-2", "s-3"]
        assert [saga.entries for saga in everything] == [(f"entry {i}",) for i in range(4)]
        completed = store.sagas("completed")
        assert [saga.header.saga_id for saga in completed] == ["s-1", "s-3"]
        assert completed == [store.load("s-1"), store.load("s-3")]
        assert store.sagas("failed") == []

    def test_sagas_refuses_an_unknown_status(self, store: Store) -> None:
        with pytest.raises(ValueError, match=_exactly(_UNKNOWN_STATUS)):
            store.sagas("done")

    # -- concurrency ----------------------------------------------------------------------

    def test_concurrent_appends_all_land(self, store: Store) -> None:
        threads, commits = 32, 20
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []

        def drive(n: int) -> None:
            try:
                saga_id = f"s-{n}"
                claim = store.claim(saga_id)
                assert claim is not None
                barrier.wait()
                store.append(claim, Commit(0, ((n, 0),), None, _header(saga_id)))
                for seq in range(1, commits):
                    status = "completed" if seq == commits - 1 else None
                    store.append(claim, Commit(seq, ((n, seq),), status))
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        workers = [threading.Thread(target=drive, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        for n in range(threads):
            saga = store.load(f"s-{n}")
            assert saga is not None
            assert saga.entries == tuple([n, seq] for seq in range(commits))
            assert (saga.seq, saga.status) == (commits, "completed")
        assert store.unfinished() == []

    # -- closing --------------------------------------------------------------------------

    def test_close_twice_is_harmless_and_closed_stores_refuse(self, store: Store) -> None:
        claim = _start(store, "s-1")
        store.close()
        store.close()
        store.release(claim)  # harmless too
        with pytest.raises(StoreError, match=r"\bclosed\.$"):
            store.load("s-1")
        with pytest.raises(StoreError, match=r"\bclosed\.$"):
            store.claim("s-2")
        with pytest.raises(StoreError, match=r"\bclosed\.$"):
            store.append(claim, Commit(1, ("a",)))


class SharedStoreConformance(StoreConformance):
    """The contract of stores whose objects share their data (a file, a server).

    Subclasses also provide `second_store`: another store object on the same data.
    """

    @pytest.fixture
    def second_store(self) -> Store:
        raise NotImplementedError(
            "A SharedStoreConformance subclass provides the second_store fixture."
        )

    def test_a_second_store_sees_commits(self, store: Store, second_store: Store) -> None:
        claim = _start(store, "s-1", ("a",))
        store.append(claim, Commit(1, ("b",), "completed"))
        assert second_store.load("s-1") == store.load("s-1")
        assert second_store.sagas("completed") == store.sagas("completed")

    def test_claims_hold_across_store_objects(self, store: Store, second_store: Store) -> None:
        claim = _start(store, "s-1")
        assert second_store.claim("s-1") is None
        with pytest.raises(StoreError, match=_not_claimed("s-1")):
            second_store.append(claim, Commit(1, ("a",)))
        store.release(claim)
        taken = second_store.claim("s-1")
        assert taken is not None
        second_store.append(taken, Commit(1, ("a",)))
        assert store.claim("s-1") is None

    def test_concurrent_claim_next_across_store_objects(
        self, store: Store, second_store: Store
    ) -> None:
        _race_for_sagas(store, [store, second_store] * 3)

    def test_claim_next_across_store_objects(self, store: Store, second_store: Store) -> None:
        for i in range(3):
            store.release(_start(store, f"s-{i}", status="pending"))
        mine = store.claim_next(2)
        assert [claim.saga_id for claim in mine] == ["s-0", "s-1"]
        assert [claim.saga_id for claim in second_store.claim_next(5)] == ["s-2"]
        assert second_store.claim_next(5) == []
        store.release(mine[0])
        assert [claim.saga_id for claim in second_store.claim_next(5)] == ["s-0"]

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks")
    def test_a_forked_child_reopens_and_holds_no_claim(self, store: Store) -> None:
        parents = _start(store, "parent's", ("a",))
        pid = os.fork()
        if pid == 0:  # the child: report by exit code, never return into pytest
            code = 99
            try:
                try:
                    store.append(parents, Commit(1, ("child",)))
                    code = 2
                except StoreError:
                    if store.claim("parent's") is not None:  # a live parent holds it
                        code = 3
                    else:
                        _start(store, "child's", ("from the child",))
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        saga = store.load("child's")
        assert saga is not None
        assert saga.entries == ("from the child",)
        store.append(parents, Commit(1, ("b",)))  # the parent's connections still work

    def test_closing_a_store_releases_its_claims(self, store: Store, second_store: Store) -> None:
        assert store.claim("s-1") is not None
        assert second_store.claim("s-1") is None
        store.close()
        assert second_store.claim("s-1") is not None
