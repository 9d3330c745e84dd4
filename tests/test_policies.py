"""Step policies at run time: retries with backoff, timeouts, the saga's deadline.

Retry schedules and deadlines run on `declsaga.testing.FakeClock`, so nothing sleeps;
timeouts of running actions use real (short) time, as they must.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import pytest
from delegates import Crashing

import declsaga
from declsaga import CompensationFailed, Context, Executor, Saga, step
from declsaga.policies import DeadlineExceeded, Retry, StepTimeout
from declsaga.stores import Store
from declsaga.testing import FakeClock


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


class Flaky:
    """An action that raises `error` on its first `failures` attempts, recording each
    attempt's number and idempotency key."""

    def __init__(self, failures: int, error: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.seen: list[tuple[int, str]] = []

    def __call__(self, ctx: Context) -> str:
        self.seen.append((ctx.attempt, ctx.idempotency_key))
        if len(self.seen) <= self.failures:
            raise self.error(f"attempt {ctx.attempt} failed")
        return f"done at attempt {ctx.attempt}"


def noop(ctx: Context) -> None:
    return None


def acts(
    actions: Mapping[str, Callable[[Context], object]],
) -> Mapping[str, Callable[[Context], object]]:
    """`actions`, typed as new() takes them (a dict literal of mixed callables is not)."""
    return actions


# -- retries ------------------------------------------------------------------------------


def test_a_step_is_retried_on_the_schedule_of_its_policy() -> None:
    flaky = Flaky(failures=3)
    retry = Retry(attempts=5, backoff=1.0, multiplier=2.0, max_delay=3.0, jitter=0)
    setup = declsaga.new(
        acts({"a": noop, "flaky": flaky}), sequence=["a", "flaky"], retries={"flaky": retry}
    )
    clock = FakeClock()
    report = Executor(clock=clock).execute(setup, saga_id="s-1")
    assert clock.sleeps == [1.0, 2.0, 3.0]  # backoff doubles, capped at max_delay
    assert flaky.seen == [(1, "s-1/1"), (2, "s-1/1"), (3, "s-1/1"), (4, "s-1/1")]
    assert [(run.action, run.error) for run in report.runs] == [("a", None), ("flaky", None)]


def test_jitter_spreads_each_delay_within_its_fraction() -> None:
    flaky = Flaky(failures=4)
    retry = Retry(attempts=5, backoff=1.0, multiplier=1.0, max_delay=10.0, jitter=0.5)
    clock = FakeClock()
    Executor(clock=clock).execute(declsaga.new({"f": flaky}, sequence=["f"], retries={"f": retry}))
    assert len(clock.sleeps) == 4
    assert all(0.5 <= delay <= 1.5 for delay in clock.sleeps), clock.sleeps


def test_spent_attempts_fail_the_step_with_its_last_error() -> None:
    flaky = Flaky(failures=10)
    undone: list[str] = []
    setup = declsaga.new(
        acts({"a": noop, "undo-a": lambda ctx: undone.append("a"), "flaky": flaky}),
        sequence=["a", "flaky"],
        compensators={"a": "undo-a"},
        retries={"flaky": Retry(attempts=3, backoff=0.5, jitter=0)},
    )
    clock = FakeClock()
    with pytest.raises(ConnectionError, match=exactly("attempt 3 failed")):
        Executor(clock=clock).execute(setup)
    assert [attempt for attempt, _ in flaky.seen] == [1, 2, 3]
    assert clock.sleeps == [0.5, 1.0]
    assert undone == ["a"]


def test_an_error_not_listed_in_on_is_not_retried() -> None:
    flaky = Flaky(failures=1, error=ValueError)
    setup = declsaga.new(
        {"flaky": flaky},
        sequence=["flaky"],
        retries={"flaky": Retry(attempts=3, on=(ConnectionError,))},
    )
    clock = FakeClock()
    with pytest.raises(ValueError, match="attempt 1 failed"):
        Executor(clock=clock).execute(setup)
    assert (flaky.seen, clock.sleeps) == ([(1, flaky.seen[0][1])], [])


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_async_steps_retry_too(mode: str) -> None:
    seen: list[int] = []

    async def flaky(ctx: Context) -> int:
        seen.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TimeoutError("slow service")
        return ctx.attempt

    setup = declsaga.new(
        {"f": flaky}, sequence=["f"], retries={"f": Retry(attempts=3, backoff=2, jitter=0)}
    )
    clock = FakeClock()
    executor = Executor(clock=clock)
    if mode == "execute":
        executor.execute(setup)
    else:
        asyncio.run(executor.execute_async(setup))
    assert (seen, clock.sleeps) == ([1, 2, 3], [2, 4])


class Counter(Saga):
    calls: list[int] = attrs.field(factory=list)
    total: int = 0

    @step(order=1, retry=Retry(attempts=3, backoff=0.1, jitter=0))
    def add(self, ctx: Context) -> None:
        self.total += 10
        self.calls = [*self.calls, ctx.attempt]
        if ctx.attempt < 3:
            raise ConnectionError("try again")


def test_each_attempt_starts_from_the_fields_of_the_run_s_start() -> None:
    saga = Counter()
    Executor(clock=FakeClock()).execute(saga)
    assert (saga.total, saga.calls) == (10, [3])


def test_compensators_retry_transient_errors_by_default() -> None:
    undo = Flaky(failures=2)  # ConnectionError twice, then it works
    setup = declsaga.new(
        acts({"a": noop, "undo-a": undo, "b": Flaky(failures=99, error=ValueError)}),
        sequence=["a", "b"],
        compensators={"a": "undo-a"},
    )
    clock = FakeClock()
    with pytest.raises(ValueError, match="attempt 1 failed"):
        Executor(clock=clock).execute(setup)
    assert [attempt for attempt, _ in undo.seen] == [1, 2, 3]
    assert len(clock.sleeps) == 2


def test_a_compensator_failing_for_good_fails_the_rollback_without_retries() -> None:
    undo = Flaky(failures=99, error=ValueError)
    setup = declsaga.new(
        acts({"a": noop, "undo-a": undo, "b": Flaky(failures=99, error=KeyError)}),
        sequence=["a", "b"],
        compensators={"a": "undo-a"},
    )
    with pytest.raises(CompensationFailed):
        Executor(clock=FakeClock()).execute(setup)
    assert [attempt for attempt, _ in undo.seen] == [1]  # ValueError is not transient


# -- timeouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_an_async_step_is_cancelled_at_its_timeout(mode: str) -> None:
    cancelled = threading.Event()
    undone: list[str] = []

    async def slow(ctx: Context) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    setup = declsaga.new(
        {"a": noop, "undo-a": lambda ctx: undone.append("a"), "slow": slow},
        sequence=["a", "slow"],
        compensators={"a": "undo-a"},
        timeouts={"slow": 0.05},
    )
    executor = Executor()
    begin = time.monotonic()
    with pytest.raises(
        StepTimeout, match=exactly("Action 'slow' did not finish within its timeout of 0.05s.")
    ) as raised:
        if mode == "execute":
            executor.execute(setup)
        else:
            asyncio.run(executor.execute_async(setup))
    assert time.monotonic() - begin < 5
    assert cancelled.is_set()
    assert (raised.value.action, raised.value.timeout) == ("slow", 0.05)
    assert undone == ["a"]


@pytest.mark.parametrize("mode", ["execute", "execute_async"])
def test_a_sync_step_that_overruns_is_abandoned_and_its_late_result_discarded(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    finished = threading.Event()

    def slow(ctx: Context) -> str:
        time.sleep(0.4)
        finished.set()
        return "late"

    setup = declsaga.new({"slow": slow}, sequence=["slow"], timeouts={"slow": 0.05})
    reports: list[declsaga.Report] = []
    executor = Executor(reporter=reports.append)
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="declsaga"), pytest.raises(StepTimeout):
        if mode == "execute":
            executor.execute(setup)
        else:
            asyncio.run(executor.execute_async(setup))
    assert time.monotonic() - begin < 0.35  # it did not wait for the thread
    assert finished.wait(5)
    time.sleep(0.05)
    assert [type(run.error) for run in reports[0].runs] == [StepTimeout]
    assert "Action 'slow' finished after it was abandoned; its result is discarded." in caplog.text


def test_a_timed_out_attempt_is_retried_when_the_policy_says_so() -> None:
    attempts: list[int] = []

    async def slow_once(ctx: Context) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.sleep(30)
        return "fast enough"

    setup = declsaga.new(
        {"s": slow_once},
        sequence=["s"],
        timeouts={"s": 0.05},
        retries={"s": Retry(attempts=2, backoff=0, on=(StepTimeout,))},
    )
    report = Executor().execute(setup)
    assert attempts == [1, 2]
    assert report.runs[0].error is None


# -- the saga's deadline ----------------------------------------------------------------------


def test_past_the_deadline_no_step_starts_and_the_rollback_runs() -> None:
    clock = FakeClock()
    ran: list[str] = []

    def slow(ctx: Context) -> None:
        ran.append("slow")
        clock.sleep(11)  # the step takes 11 of the saga's 10 seconds

    setup = declsaga.new(
        {
            "slow": slow,
            "undo": lambda ctx: ran.append("undo"),
            "next": lambda ctx: ran.append("next"),
        },
        sequence=["slow", "next"],
        compensators={"slow": "undo"},
        deadline=10.0,
    )
    with pytest.raises(
        DeadlineExceeded,
        match=exactly("The saga's deadline of 10s passed at action 'next'; it rolls back."),
    ):
        Executor(clock=clock).execute(setup)
    assert ran == ["slow", "undo"]


def test_the_executor_s_deadline_applies_when_the_saga_has_none() -> None:
    clock = FakeClock()
    setup = declsaga.new({"a": lambda ctx: clock.sleep(5), "b": noop}, sequence=["a", "b"])
    with pytest.raises(DeadlineExceeded, match="deadline of 3s passed at action 'b'"):
        Executor(clock=clock, deadline=3).execute(setup)
    Executor(clock=clock, deadline=30).execute(setup)


def test_the_deadline_cuts_a_running_async_step_short() -> None:
    async def forever(ctx: Context) -> None:
        await asyncio.sleep(30)

    setup = declsaga.new({"f": forever}, sequence=["f"], deadline=0.05)
    begin = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="passed at action 'f'"):
        Executor().execute(setup)
    assert time.monotonic() - begin < 5


class Timed(Saga, deadline=10.0):
    done: list[str] = attrs.field(factory=list)

    @step(order=1, timeout=5.0)
    def first(self, ctx: Context) -> None:
        self.done = [*self.done, "first"]

    @step(order=2)
    def second(self, ctx: Context) -> None:
        self.done = [*self.done, "second"]


def test_dsl_policies_run() -> None:
    saga = Timed()
    Executor(clock=FakeClock()).execute(saga)
    assert saga.done == ["first", "second"]


# -- durable ----------------------------------------------------------------------------------


ATTEMPTS: list[tuple[int, str]] = []


def flaky_charge(ctx: Context) -> str:
    ATTEMPTS.append((ctx.attempt, ctx.idempotency_key))
    if ctx.attempt < 3:
        raise ConnectionError(f"attempt {ctx.attempt}")
    return "charged"


FLAKY = declsaga.new(
    {"reserve": noop, "charge": flaky_charge},
    sequence=["reserve", "charge"],
    name="tests.policies.flaky",
    retries={"charge": Retry(attempts=4, backoff=0.01, jitter=0)},
)


def test_attempts_are_journal_entries_and_a_crash_keeps_their_count(store: Store) -> None:
    ATTEMPTS.clear()
    # Commits: 1 start, 2 reserve done + charge started, 3 attempt 1 failed, 4 attempt 2
    # failed: the process "dies" there, attempt 2's failure not recorded.
    with pytest.raises(declsaga.StoreError):
        dying = Executor(store=Crashing(store, 4), clock=FakeClock())
        dying.execute(FLAKY, saga_id="f-1")
    assert [attempt for attempt, _ in ATTEMPTS] == [1, 2]
    saga = store.load("f-1")
    assert saga is not None
    failed = [e for e in saga.entries if isinstance(e, dict) and e["kind"] == "attempt_failed"]
    assert [(e["run"], e["attempt"], e["delay"]) for e in failed] == [(1, 1, 0.01)]
    assert failed[0]["error"]["message"] == "attempt 1"
    [recovered] = Executor(store=store, clock=FakeClock()).recover()
    assert recovered.status == "completed"
    # Attempt 2 was in flight: it runs again, then attempt 3 succeeds; one key throughout.
    assert ATTEMPTS == [(1, "f-1/1"), (2, "f-1/1"), (2, "f-1/1"), (3, "f-1/1")]


CHILD = """
import os, signal
import declsaga, declsaga.policies
from declsaga.testing import FakeClock

def charge(ctx):
    with open({effects!r}, "a") as out:
        out.write(f"{{ctx.attempt}} {{ctx.idempotency_key}}\\n")
    if ctx.attempt == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    raise ConnectionError("down")

retry = declsaga.policies.Retry(attempts=5, backoff=0.01, jitter=0)
setup = declsaga.new({{"charge": charge}}, sequence=["charge"], name="tests.policies.killed",
                     retries={{"charge": retry}})
executor = declsaga.Executor(store=declsaga.SQLiteStore({db!r}), clock=FakeClock())
executor.execute(setup, saga_id="k-1")
"""

RECOVER = """
import declsaga, declsaga.policies
from declsaga.testing import FakeClock

def charge(ctx):
    with open({effects!r}, "a") as out:
        out.write(f"{{ctx.attempt}} {{ctx.idempotency_key}}\\n")
    return "charged"

retry = declsaga.policies.Retry(attempts=5, backoff=0.01, jitter=0)
setup = declsaga.new({{"charge": charge}}, sequence=["charge"], name="tests.policies.killed",
                     retries={{"charge": retry}})
executor = declsaga.Executor(store=declsaga.SQLiteStore({db!r}), clock=FakeClock())
[one] = executor.recover()
print(one.status)
"""


def test_a_retry_survives_sigkill_with_its_attempt_count(tmp_path: Path) -> None:
    db, effects = str(tmp_path / "s.db"), str(tmp_path / "effects")
    values = {"db": db, "effects": effects}
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(**values)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    recovery = subprocess.run(
        [sys.executable, "-c", RECOVER.format(**values)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert recovery.stdout.strip() == "completed", recovery.stderr
    lines = Path(effects).read_text().split("\n")[:-1]
    # Attempt 1 failed and was recorded; attempt 2 died with its process, so it runs
    # again as attempt 2 in the new process, with the same key.
    assert lines == ["1 k-1/0", "2 k-1/0", "2 k-1/0"]
    with declsaga.SQLiteStore(db) as store:
        saga = store.load("k-1")
        assert saga is not None
        kinds = [e["kind"] for e in saga.entries if isinstance(e, dict)]
        assert kinds.count("attempt_failed") == 1


# -- bad input ----------------------------------------------------------------------------------


def test_the_executor_checks_its_clock_and_deadline() -> None:
    with pytest.raises(declsaga.UsageError, match=r"^clock must have monotonic"):
        Executor(clock=object())  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=exactly("deadline must be a number of seconds above 0, got -1.")
    ):
        Executor(deadline=-1)


def test_fake_clock() -> None:
    clock = FakeClock(start=5)
    clock.sleep(2)
    asyncio.run(clock.sleep_async(3))
    assert (clock.monotonic(), clock.sleeps) == (10, [2, 3])
    assert repr(clock) == "FakeClock(now=10)"
