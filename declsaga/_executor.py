"""`Executor`: runs setups with goes' semantics; blocking and asyncio entry points."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from asyncio import events
from collections.abc import Callable
from datetime import timedelta
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from ._attempts import Limits
from ._concurrently import check_concurrency, each, each_async
from ._drivers import finish, forward_async, forward_blocking, rollback
from ._durable import identify
from ._errors import CompensationFailed, SagaBusy, SagaError, StoreError, UsageError, describe
from ._execution import Execution
from ._journal import SagaEnded, SagaStarted, Status
from ._loops import off_loop
from ._policies import Clock, SystemClock, seconds_problem
from ._report import Recovered, Report, build_report
from ._setup import Setup, check_setup, validate_checked
from ._stored import Ended, check_submitted, ended, open_saga, resolve, submit_saga
from ._waiting import check_saga_id, load_known, until_ended, until_ended_async
from .stores._base import FINAL_STATUSES, Claim, Commit, Store, StoredSaga

if TYPE_CHECKING:
    from ._components import AggregateRepository, CommandBus, EventBus
    from ._durable import DurableLog, Replay
    from ._engine import Finish

logger = logging.getLogger("declsaga")

__all__ = ["DEFAULT_COMPENSATE_TIMEOUT", "Executor", "execute", "outcome_error"]

DEFAULT_COMPENSATE_TIMEOUT: Final = 10.0

Reporter = Callable[[Report], object]

_SYSTEM_CLOCK = SystemClock()
_SHORT = Limits(_SYSTEM_CLOCK, None, None, None, steps=False)  # no policies, no deadline

# How a setup exposes its policies (see `_dsl` and `_setup`): whether it has any, one
# action's, and its deadline. Not part of the Setup protocol, which SPEC fixes.
_POLICY = "_declsaga_policies"
_POLICY_OF = "_declsaga_policy"
_DEADLINE = "_declsaga_deadline"


def _new_saga_id() -> str:
    """`str(uuid.uuid4())`, at less than half its cost (paid once per execution): the
    same 122 random bits from os.urandom, version 4, RFC 4122 variant, same text."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # variant RFC 4122
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _seconds(timeout: object) -> float:
    """`compensate_timeout` as seconds: a positive number, inf, or a positive timedelta."""
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        seconds = math.nan
    if not seconds > 0:  # also catches NaN
        raise ValueError(
            "compensate_timeout must be a number of seconds > 0, math.inf, or a positive "
            f"timedelta, got {describe(timeout)}."
        )
    return seconds


class Executor:
    """Runs setups. Holds configuration only, so one executor may run many sagas at once.

    With a `store`, every execution is durable: its journal is committed as it goes, and
    `recover()` finishes the sagas of processes that died.
    """

    __slots__ = (
        "_clock",
        "_command_bus",
        "_compensate_timeout",
        "_deadline",
        "_event_bus",
        "_reporter",
        "_repository",
        "_skip_validation",
        "_store",
    )

    def __init__(
        self,
        *,
        repository: AggregateRepository | None = None,
        event_bus: EventBus | None = None,
        command_bus: CommandBus | None = None,
        reporter: Reporter | None = None,
        compensate_timeout: float | timedelta = DEFAULT_COMPENSATE_TIMEOUT,
        skip_validation: bool = False,
        store: Store | None = None,
        clock: Clock | None = None,
        deadline: float | None = None,
    ) -> None:
        if reporter is not None and not callable(reporter):
            raise UsageError(
                f"reporter must be a callable taking a Report, got {describe(reporter)}."
            )
        if store is not None and not isinstance(store, Store):
            raise UsageError(f"store must be a declsaga store, got {describe(store)}.")
        self._repository = repository
        self._event_bus = event_bus
        self._command_bus = command_bus
        self._reporter = reporter
        self._compensate_timeout = _seconds(compensate_timeout)
        self._skip_validation = bool(skip_validation)
        self._store = store
        if clock is not None and not isinstance(clock, Clock):
            raise UsageError(
                "clock must have monotonic(), sleep() and async sleep_async(), got "
                f"{describe(clock)}."
            )
        self._clock = clock
        if deadline is not None and (problem := seconds_problem(deadline)) is not None:
            raise ValueError(f"deadline {problem}.")
        self._deadline = deadline

    @property
    def store(self) -> Store | None:
        """The store that makes executions durable, or None."""
        return self._store

    def __repr__(self) -> str:
        store = "" if self._store is None else f" store={self._store!r}"
        return f"<Executor compensate_timeout={self._compensate_timeout:g}s{store}>"

    # -- running a saga --------------------------------------------------------------------

    def _checked(self, setup: object, saga_id: str | None, api: str) -> tuple[Setup, str]:
        checked = check_setup(setup, api)
        if saga_id is None:
            saga_id = _new_saga_id()
        elif not isinstance(saga_id, str) or not saga_id.strip():
            raise UsageError(f"saga_id must be a non-empty string, got {describe(saga_id)}.")
        if not self._skip_validation:
            validate_checked(checked)
        return checked, saga_id

    def _limits(self, setup: Setup, replay: Replay | None) -> Limits:
        """The clock, deadline and policies an execution of `setup` runs under; its
        steps take the short path if it has neither policies nor a deadline."""
        policies = getattr(setup, _POLICY, None)
        deadline_of = getattr(setup, _DEADLINE, None)
        deadline = deadline_of() if deadline_of is not None else None
        if deadline is None:
            deadline = self._deadline
        if deadline is None and (policies is None or not policies()):
            return _SHORT if self._clock is None else Limits(self._clock, None, None, None, False)
        clock = _SYSTEM_CLOCK if self._clock is None else self._clock
        deadline_at = None
        if deadline is not None:
            # From the saga's first start, also when it resumes after a crash.
            started = next(r for r in replay.records if type(r) is SagaStarted) if replay else None
            elapsed = 0.0 if started is None else time.time() - started.wall.timestamp()
            deadline_at = clock.monotonic() + deadline - elapsed
        policy = getattr(setup, _POLICY_OF, None)
        return Limits(clock, deadline, deadline_at, policy)

    def _execution(
        self,
        setup: Setup,
        saga_id: str,
        loop: asyncio.AbstractEventLoop | None,
        log: DurableLog | None = None,
        replay: Replay | None = None,
    ) -> Execution:
        return Execution(
            setup,
            saga_id,
            repository=self._repository,
            event_bus=self._event_bus,
            command_bus=self._command_bus,
            compensate_timeout=self._compensate_timeout,
            loop=loop,
            log=log,
            replay=replay,
            limits=self._limits(setup, replay),
        )

    def execute(self, setup: Setup, *, saga_id: str | None = None) -> Report:
        """Run `setup` to its end on the calling thread; return the report or raise."""
        if events._get_running_loop() is not None:
            raise SagaError(
                "execute() blocks, but it was called from a running event loop: "
                "use 'await executor.execute_async(...)' instead."
            )
        fresh = saga_id is None  # then _checked generates a new uuid4
        checked, saga_id = self._checked(setup, saga_id, "execute")
        if self._store is None:
            return self._raise(self._drive(self._execution(checked, saga_id, None)))
        store = self._store
        identity = identify(checked)
        claim = store.claim(saga_id)
        if claim is None:
            raise SagaBusy(saga_id)
        try:
            build = functools.partial(self._resumed, saga_id, None)
            opened = open_saga(store, claim, checked, identity, build, fresh=fresh)
            if isinstance(opened, Ended):
                return self._raise(_recorded(opened))
            return self._raise(self._drive(opened))
        finally:
            store.release(claim)

    async def execute_async(self, setup: Setup, *, saga_id: str | None = None) -> Report:
        """Run `setup` to its end from asyncio code; return the report or raise."""
        loop = asyncio.get_running_loop()
        fresh = saga_id is None  # then _checked generates a new uuid4
        checked, saga_id = self._checked(setup, saga_id, "execute_async")
        if self._store is None:
            return self._raise(await self._drive_async(self._execution(checked, saga_id, loop)))
        store = self._store
        identity = identify(checked)
        claim = await off_loop(store.claim, saga_id, undo=store.release)
        if claim is None:
            raise SagaBusy(saga_id)
        try:
            build = functools.partial(self._resumed, saga_id, loop)
            if fresh:  # no I/O then: not worth a worker thread
                opened = open_saga(store, claim, checked, identity, build, fresh=True)
            else:
                opened = await off_loop(open_saga, store, claim, checked, identity, build)
            if isinstance(opened, Ended):
                return self._raise(_recorded(opened))
            return self._raise(await self._drive_async(opened))
        finally:
            await off_loop(store.release, claim)

    def _resumed(
        self,
        saga_id: str,
        loop: asyncio.AbstractEventLoop | None,
        setup: Setup,
        log: DurableLog,
        replay: Replay | None,
    ) -> Execution:
        return self._execution(setup, saga_id, loop, log, replay)

    def _drive(self, execution: Execution) -> tuple[Report, BaseException | None]:
        try:
            forward_blocking(execution)
            if execution.engine.status is Status.COMPENSATING:
                # Sync compensators run in worker threads so the budget can abandon them.
                execution.block_on(rollback(execution))
            decision = finish(execution)
            execution.commit()
        finally:
            execution.close_private_loop()
        return self._conclude(execution, decision, None)

    async def _drive_async(self, execution: Execution) -> tuple[Report, BaseException | None]:
        await forward_async(execution)
        late_cancel = None
        if execution.engine.status is Status.COMPENSATING:
            late_cancel = await _shielded(rollback(execution))
        decision = finish(execution)
        try:
            await execution.commit_async()
        except asyncio.CancelledError as cancelled:  # the commit itself was waited for
            late_cancel = cancelled
        return self._conclude(execution, decision, late_cancel)

    def _conclude(
        self, execution: Execution, decision: Finish, late_cancel: asyncio.CancelledError | None
    ) -> tuple[Report, BaseException | None]:
        """Report once; return the report and what the execution raises."""
        raised = outcome_error(decision, late_cancel)
        report = build_report(execution.records, raised, perf_counter())
        if self._reporter is not None:
            try:
                self._reporter(report)
            except BaseException as reporter_error:
                if isinstance(raised, asyncio.CancelledError):
                    # The cancellation must win; the reporter's error becomes its context.
                    raise raised  # noqa: B904
                reporter_error.__context__ = raised
                raise
        return report, raised

    @staticmethod
    def _raise(outcome: tuple[Report, BaseException | None]) -> Report:
        report, raised = outcome
        if raised is not None:
            raise raised
        return report

    # -- submitting and waiting ------------------------------------------------------------

    def _store_for(self, api: str) -> Store:
        if self._store is None:
            raise UsageError(f"{api}() needs an executor with a store: Executor(store=...).")
        return self._store

    def submit(self, setup: Setup, *, saga_id: str | None = None) -> str:
        """Record `setup` as a pending saga for a worker to run, and return its id at once.

        Idempotent by id: submitting an id that is recorded already (pending, running or
        ended) changes nothing, as long as it was recorded with the same definition and
        initial fields (else a `UsageError`)."""
        store = self._store_for("submit")
        fresh = saga_id is None
        checked, saga_id = self._checked(setup, saga_id, "submit")
        identity = identify(checked)
        claim = store.claim(saga_id)
        if claim is None:  # a worker drives it, or another caller is submitting it now
            check_submitted(store, saga_id, checked, identity)
            return saga_id
        try:
            submit_saga(store, claim, checked, identity, fresh=fresh)
        finally:
            store.release(claim)
        return saga_id

    async def submit_async(self, setup: Setup, *, saga_id: str | None = None) -> str:
        """`submit` from asyncio code, which it never blocks."""
        self._store_for("submit_async")
        return await off_loop(functools.partial(self.submit, setup, saga_id=saga_id))

    def wait(self, saga_id: str, *, timeout: float | None = None) -> Report:
        """Wait for the saga `saga_id` to end, wherever it runs; return its recorded report
        or raise its recorded error, as `execute` would have.

        `TimeoutError` if it has not ended within `timeout` seconds (None: no limit); a
        `UsageError` if the store has no saga with that id. The reporter is not called:
        whoever ran the saga reported it."""
        stored = until_ended(self._store_for("wait"), saga_id, timeout)
        return self._raise(_recorded(ended(stored)))

    async def wait_async(self, saga_id: str, *, timeout: float | None = None) -> Report:
        """`wait` from asyncio code, which it never blocks."""
        stored = await until_ended_async(self._store_for("wait_async"), saga_id, timeout)
        return self._raise(_recorded(ended(stored)))

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, saga_id: str) -> bool:
        """Cancel an unfinished saga, wherever it runs: it stops at its next transition
        and rolls back (status `compensated`, raising `SagaCancelled`). True if the saga
        exists and had not ended. A saga nobody drives (pending, or orphaned) is rolled
        back by the next worker or `recover()` that takes it; one whose last step has
        already finished completes."""
        store = self._store_for("cancel")
        check_saga_id(saga_id)
        return store.request_cancel(saga_id)

    def retry(self, saga_id: str) -> Report:
        """Retry the rollback of a `failed` saga from its failed compensation, here and
        now; return its report or raise its error, as `execute` would. Recorded in the
        journal (`rollback_retried`)."""
        store = self._store_for("retry")
        claim, stored = self._operate(store, saga_id, "retried")
        try:
            resolved = resolve(stored)
            if isinstance(resolved, str):
                raise UsageError(
                    resolved.replace(" It is left untouched.", " It cannot be retried.")
                )
            entry = {"kind": "rollback_retried", "at": time.time()}
            store.append(claim, Commit(stored.seq, (entry,), Status.COMPENSATING.value))
            opened = self._reopen(store, claim, None)
            assert isinstance(opened, Execution), opened
            return self._raise(self._drive(opened))
        finally:
            store.release(claim)

    def resolve(self, saga_id: str, reason: str) -> None:
        """Mark a `failed` saga as resolved by hand (status `resolved`, final), with the
        operator's `reason` recorded in its journal."""
        store = self._store_for("resolve")
        if not isinstance(reason, str) or not reason.strip():
            raise UsageError(
                f"resolve() needs a reason, a non-empty string, got {describe(reason)}."
            )
        claim, stored = self._operate(store, saga_id, "resolved")
        try:
            entry = {
                "kind": "saga_ended",
                "status": Status.RESOLVED.value,
                "error": None,
                "reason": reason,
                "at": time.time(),
            }
            store.append(claim, Commit(stored.seq, (entry,), Status.RESOLVED.value))
        finally:
            store.release(claim)

    @staticmethod
    def _operate(store: Store, saga_id: str, done: str) -> tuple[Claim, StoredSaga]:
        """The claim of a failed saga an operator acts on, and the saga as stored."""
        check_saga_id(saga_id)
        claim = store.claim(saga_id)
        if claim is None:
            raise SagaBusy(saga_id)
        try:
            stored = load_known(store, saga_id)
            if stored.status != Status.FAILED.value:
                raise UsageError(
                    f"Saga {saga_id!r} is {stored.status}: only a failed saga can be {done}."
                )
        except BaseException:
            store.release(claim)
            raise
        return claim, stored

    # -- recovery --------------------------------------------------------------------------

    def recover(self, *, concurrency: int = 1) -> list[Recovered]:
        """Finish every unfinished saga of the store that no live process drives.

        `concurrency`: how many sagas to drive at once, each on a thread of its own
        (their commits share transactions: group commit). The outcomes come in the
        order of `store.unfinished()`. A store failure stops the recovery: no saga
        starts after it, the ones running finish, then it is raised."""
        if events._get_running_loop() is not None:
            raise SagaError(
                "recover() blocks, but it was called from a running event loop: "
                "use 'await executor.recover_async()' instead."
            )
        store = self._store_for("recover")
        check_concurrency(concurrency)
        ids = store.unfinished()
        outcomes = each(ids, concurrency, functools.partial(self._recover_one, store))
        return [outcome for outcome in outcomes if outcome is not None]

    def _recover_one(self, store: Store, saga_id: str) -> Recovered | None:
        claim = store.claim(saga_id)
        if claim is None:
            return None  # a live process drives it
        try:
            opened = self._reopen(store, claim, None)
            if isinstance(opened, Execution):
                return _recovered(opened, self._drive(opened))
            return opened
        finally:
            store.release(claim)

    async def recover_async(self, *, concurrency: int = 1) -> list[Recovered]:
        """`recover()` from asyncio code; `concurrency` sagas run as tasks at once."""
        store = self._store_for("recover_async")
        check_concurrency(concurrency)
        loop = asyncio.get_running_loop()
        ids = await off_loop(store.unfinished)
        one = functools.partial(self._recover_one_async, store, loop=loop)
        outcomes = await each_async(ids, concurrency, one)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _recover_one_async(
        self, store: Store, saga_id: str, *, loop: asyncio.AbstractEventLoop
    ) -> Recovered | None:
        claim = await off_loop(store.claim, saga_id, undo=store.release)
        if claim is None:
            return None
        try:
            opened = await off_loop(self._reopen, store, claim, loop)
            if isinstance(opened, Execution):
                return _recovered(opened, await self._drive_async(opened))
            return opened
        finally:
            await off_loop(store.release, claim)

    def _reopen(
        self, store: Store, claim: Claim, loop: asyncio.AbstractEventLoop | None
    ) -> Execution | Recovered | None:
        """A claimed unfinished saga, ready to drive; or why not (None: finished meanwhile)."""
        stored = store.load(claim.saga_id)
        if stored is None or stored.status in FINAL_STATUSES:
            return None
        name = stored.header.name
        resolved = resolve(stored)
        if isinstance(resolved, str):
            logger.warning("%s", resolved)
            return Recovered(claim.saga_id, name, stored.status, None, None, resolved)
        setup, identity = resolved
        build = functools.partial(self._resumed, claim.saga_id, loop)
        try:
            opened = open_saga(store, claim, setup, identity, build, stored=stored)
        except StoreError as error:
            # Given `stored`, open_saga does no I/O: its journal cannot be decoded here.
            # Refused like an unknown definition, so the other sagas are still recovered.
            refused = f"{error} It is left untouched."
            logger.warning("%s", refused)
            return Recovered(claim.saga_id, name, stored.status, None, None, refused)
        assert isinstance(opened, Execution)  # it was unfinished when loaded under the claim
        return opened


def _recovered(execution: Execution, outcome: tuple[Report, BaseException | None]) -> Recovered:
    report, error = outcome
    name = execution.log.name if execution.log is not None else ""
    status = execution.engine.status.value
    return Recovered(execution.saga_id, name, status, report, error)


def _recorded(ended: Ended) -> tuple[Report, BaseException | None]:
    """The outcome of a saga that ended before: its report, and what it raised."""
    raised = outcome_error(ended.decision, None)
    last = ended.replay.records[-1]
    assert type(last) is SagaEnded
    return build_report(ended.replay.records, raised, last.at), raised


def outcome_error(
    decision: Finish, late_cancel: asyncio.CancelledError | None
) -> BaseException | None:
    """What the execution raises: the action's own error, or the rollback's failure."""
    error = decision.error
    if late_cancel is not None:
        # Cancelled during the rollback: the rollback finished, the cancellation stands.
        if isinstance(error, CompensationFailed):
            late_cancel.__cause__ = error
        return late_cancel
    if isinstance(error, CompensationFailed) and not isinstance(error.action_error, Exception):
        # A cancellation or KeyboardInterrupt must keep propagating as itself.
        error.action_error.__cause__ = error
        return error.action_error
    return error


async def _shielded(rollback: Any) -> asyncio.CancelledError | None:
    """Run the rollback to its end even if the caller is cancelled meanwhile; return the
    last cancellation received, if any."""
    task = asyncio.ensure_future(rollback)
    cancelled = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:
            # Also when the rollback has just finished: the cancellation arrived before
            # this task woke up. It stands, after the saga is concluded and reported.
            cancelled = error
    task.result()  # the rollback task itself is only cancelled when the loop shuts down
    return cancelled


def execute(setup: Setup, *, saga_id: str | None = None, **executor_options: Any) -> Report:
    """`Executor(**executor_options).execute(setup, saga_id=saga_id)`."""
    return Executor(**executor_options).execute(setup, saga_id=saga_id)
