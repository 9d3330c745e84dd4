"""`submit` and `wait`: sagas recorded as pending, run elsewhere, waited for by id."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from workersagas import ENTERED, GATES, Held, Transfer

import declsaga
from declsaga import Executor, Report, UsageError
from declsaga.stores import Store


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_submit_records_a_pending_saga_and_runs_nothing(store: Store) -> None:
    executor = Executor(store=store)
    saga_id = executor.submit(Transfer(amount=5), saga_id="t-1")
    assert saga_id == "t-1"
    record = store.get("t-1")  # type: ignore[attr-defined]
    assert record is not None
    assert (record.status, record.name, record.journal) == ("pending", "tests.workers.Transfer", ())
    assert record.fields == {"amount": 5, "work_ms": 0, "debit_ms": None, "fail": False, "done": []}
    assert record.report is None  # not started
    assert store.unfinished() == ["t-1"]


def test_submit_generates_an_id(store: Store) -> None:
    saga_id = Executor(store=store).submit(Transfer())
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid4, saga_id)
    assert store.unfinished() == [saga_id]


def test_submit_is_idempotent_by_id(store: Store) -> None:
    executor = Executor(store=store)
    assert executor.submit(Transfer(amount=5), saga_id="t-1") == "t-1"
    assert executor.submit(Transfer(amount=5), saga_id="t-1") == "t-1"
    saga = store.load("t-1")
    assert saga is not None and saga.seq == 1  # one commit: the first submission's
    executor.recover()
    assert executor.submit(Transfer(amount=5), saga_id="t-1") == "t-1"  # ended: still fine
    assert store.unfinished() == []


def test_submitting_an_id_with_other_fields_is_a_usage_error(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(amount=5), saga_id="t-1")
    with pytest.raises(
        UsageError,
        match=exactly(
            "Saga id 't-1' is recorded with other settings: this call gives other initial "
            "values for amount."
        ),
    ):
        executor.submit(Transfer(amount=6), saga_id="t-1")


def test_submit_while_the_id_is_held_checks_what_is_recorded(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(amount=5), saga_id="t-1")
    claim = store.claim("t-1")  # as a worker running it would
    assert claim is not None
    assert executor.submit(Transfer(amount=5), saga_id="t-1") == "t-1"
    with pytest.raises(UsageError, match="other initial values for amount"):
        executor.submit(Transfer(amount=6), saga_id="t-1")
    store.release(claim)


def test_recover_runs_submitted_sagas_and_wait_returns_their_report(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(amount=5), saga_id="t-1")
    executor.submit(Transfer(amount=6, fail=True), saga_id="t-2")
    recovered = executor.recover()
    assert [(r.saga_id, r.status) for r in recovered] == [
        ("t-1", "completed"),
        ("t-2", "compensated"),
    ]
    report = executor.wait("t-1", timeout=0)
    assert [run.action for run in report.runs] == ["debit", "credit", "notify"]
    with pytest.raises(RuntimeError, match=exactly("cannot notify about 6")):
        executor.wait("t-2", timeout=0)
    record = store.get("t-1")  # type: ignore[attr-defined]
    assert record.fields["done"] == ["debit", "credit", "notify"]


def test_execute_runs_a_submitted_saga(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(amount=5), saga_id="t-1")
    saga = Transfer(amount=5)
    report = executor.execute(saga, saga_id="t-1")
    assert saga.done == ["debit", "credit", "notify"]
    assert [run.action for run in executor.wait("t-1").runs] == [run.action for run in report.runs]
    saga_record = store.load("t-1")
    assert saga_record is not None
    assert saga_record.status == "completed"
    # The submission, the start (it rides with the first run), then one commit per step.
    assert saga_record.seq == 1 + 4


def test_wait_times_out_while_the_saga_is_pending(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(), saga_id="t-1")
    begin = time.monotonic()
    with pytest.raises(
        TimeoutError, match=exactly("Saga 't-1' did not end within 0.05s; it is pending.")
    ):
        executor.wait("t-1", timeout=0.05)
    assert time.monotonic() - begin >= 0.05


def test_wait_returns_once_another_thread_finishes_the_saga(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Held(), saga_id="h-1")
    runner = threading.Thread(target=executor.recover)
    GATES["h-1"] = threading.Event()
    ENTERED["h-1"] = threading.Event()
    runner.start()
    try:
        assert ENTERED["h-1"].wait(10)
        with pytest.raises(TimeoutError, match="it is running"):
            executor.wait("h-1", timeout=0.02)
        GATES["h-1"].set()
        report = executor.wait("h-1", timeout=10)
        assert [run.action for run in report.runs] == ["first", "hold", "last"]
    finally:
        GATES["h-1"].set()
        runner.join()


def test_wait_async(store: Store) -> None:
    executor = Executor(store=store)

    async def main() -> Report:
        saga_id = await executor.submit_async(Transfer(amount=1))
        waiting = asyncio.ensure_future(executor.wait_async(saga_id, timeout=10))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await executor.recover_async()
        return await waiting

    report = asyncio.run(main())
    assert [run.action for run in report.runs] == ["debit", "credit", "notify"]


def test_wait_async_times_out(store: Store) -> None:
    executor = Executor(store=store)
    executor.submit(Transfer(), saga_id="t-1")
    message = "Saga 't-1' did not end within 0s; it is pending."
    with pytest.raises(TimeoutError, match=exactly(message)):
        asyncio.run(executor.wait_async("t-1", timeout=0))


def test_wait_for_an_unknown_id(store: Store) -> None:
    with pytest.raises(
        UsageError,
        match=exactly(f"Saga 'nope' is not in {store!r}: submit or execute it first."),
    ):
        Executor(store=store).wait("nope")


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_wait_refuses_a_bad_timeout(store: Store, timeout: object) -> None:
    with pytest.raises(
        ValueError,
        match=exactly(f"timeout must be None or a number of seconds >= 0, got {timeout!r}."),
    ):
        Executor(store=store).wait("t-1", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("api", ["submit", "wait"])
def test_submit_and_wait_need_a_store(api: str) -> None:
    executor = Executor()
    call = (lambda: executor.submit(Transfer())) if api == "submit" else lambda: executor.wait("x")
    with pytest.raises(
        UsageError, match=exactly(f"{api}() needs an executor with a store: Executor(store=...).")
    ):
        call()


def test_submit_refuses_what_a_store_cannot_find_again(store: Store) -> None:
    anonymous = declsaga.new({"a": lambda ctx: None}, sequence=["a"])
    with pytest.raises(UsageError, match="new\\(\\.\\.\\., name=\\.\\.\\.\\)"):
        Executor(store=store).submit(anonymous)
    assert store.unfinished() == []
