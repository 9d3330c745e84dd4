"""Workers: long-running processes that run submitted sagas and take over orphaned ones.

A `Worker` claims unfinished sagas from its executor's store (`claim_next`: pending
ones, and those whose process died or whose lease expired), and drives each one with the
same engine as `execute`, resuming it by the rules of recovery. Run several, on one host
(SQLite) or many (PostgreSQL); `python -m declsaga worker` runs one from the shell.

Stopping (`stop()`, or SIGTERM under the command line) stops claiming; each running
saga is left at its next step boundary, its journal complete so far, and its claim is
released for another worker. A step that outlasts the grace period has its claim
released anyway: the process is expected to exit then.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time

from ._errors import Abandoned, LeaseLost, Parked, StoreError, UsageError, describe
from ._execution import Execution
from ._executor import Executor
from ._report import Recovered
from .stores._base import Claim, Store

__all__ = ["Worker"]

logger = logging.getLogger("declsaga.worker")

_LONGEST_BACKOFF = 30.0  # seconds between attempts while the store keeps failing


def _positive(name: str, value: object, *, integer: bool = False) -> float:
    kinds = int if integer else (int, float)
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or not (0 < value < math.inf)  # NaN fails this too
    ):
        kind = "an int" if integer else "a number of seconds"
        raise ValueError(f"{name} must be {kind} above 0, got {value!r}.")
    return value


class Worker:
    """Runs the unfinished sagas of `executor`'s store, `concurrency` at a time.

    `poll_interval`: seconds between looks for new work when there is none (with some
    jitter, so that idle workers do not poll in step). `retry_refused`: seconds before a
    saga this worker cannot run (its definition is not imported here, or has changed) is
    offered again to any worker; meanwhile this worker holds it, so it does not come back
    at the front of every search.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        concurrency: int = 4,
        poll_interval: float = 0.5,
        retry_refused: float = 60.0,
    ) -> None:
        if not isinstance(executor, Executor):
            raise UsageError(f"A Worker runs an Executor, got {describe(executor)}.")
        store = executor.store
        if store is None:
            raise UsageError("A Worker needs an executor with a store: Executor(store=...).")
        self.executor = executor
        self.store: Store = store
        self.concurrency = int(_positive("concurrency", concurrency, integer=True))
        self.poll_interval = float(_positive("poll_interval", poll_interval))
        self.retry_refused = float(_positive("retry_refused", retry_refused))
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Claim, Execution]] = {}
        self._refused: list[tuple[float, Claim]] = []  # (when to let go, claim held)
        self._started = False

    def __repr__(self) -> str:
        return f"<Worker concurrency={self.concurrency} store={self.store!r}>"

    @property
    def running(self) -> list[str]:
        """Ids of the sagas this worker drives at the moment."""
        with self._lock:
            return list(self._running)

    def stop(self) -> None:
        """Ask `run` to stop: no more claims, running sagas left at their next step
        boundary. Returns at once; safe from a signal handler and from any thread."""
        self._stopping.set()

    def run(self, *, grace: float = 30.0) -> None:
        """Work until `stop()` is called; then wait up to `grace` seconds for the running
        sagas to reach a step boundary, release every claim, and return."""
        _positive("grace", grace)
        with self._lock:
            if self._started:
                raise UsageError("A Worker runs once; create a new one to run again.")
            self._started = True
        slots = [
            threading.Thread(target=self._slot, name=f"declsaga-worker-{n}", daemon=True)
            for n in range(self.concurrency)
        ]
        for slot in slots:
            slot.start()
        # Waiting in slices keeps the main thread responsive to signals.
        while not self._stopping.wait(0.2):
            pass
        deadline = time.monotonic() + grace
        for slot in slots:
            slot.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            overdue = [claim for claim, _ in self._running.values()]
            refused, self._refused = [claim for _, claim in self._refused], []
        if overdue:
            logger.warning(
                "Grace period of %gs over; releasing the claims of %d saga(s) still in a step: %s.",
                grace,
                len(overdue),
                ", ".join(claim.saga_id for claim in overdue),
            )
        for claim in overdue + refused:
            self._release(claim)

    # -- one slot: claim a saga, drive it, repeat -------------------------------------------

    def _slot(self) -> None:
        backoff = self.poll_interval
        while not self._stopping.is_set():
            self._let_go_of_refused()
            try:
                claims = self.store.claim_next(1)
            except StoreError as error:
                backoff = min(backoff * 2, _LONGEST_BACKOFF)
                logger.warning("The store failed (retrying in %.1fs): %s", backoff, error)
                self._stopping.wait(backoff)
                continue
            backoff = self.poll_interval
            if not claims:
                self._stopping.wait(self.poll_interval * random.uniform(0.5, 1.5))
                continue
            self._drive(claims[0])

    def _drive(self, claim: Claim) -> None:
        saga_id = claim.saga_id
        try:
            opened = self.executor._reopen(self.store, claim, None)
            if isinstance(opened, Recovered):  # refused, and logged, by _reopen: held
                with self._lock:
                    self._refused.append((time.monotonic() + self.retry_refused, claim))
                return
            if opened is None:  # it ended between the search and the claim
                self._release(claim)
                return
            opened.stop_when = self._stopping
            # A retry that waits longer than a poll parks the saga for any worker.
            opened.park_after = self.poll_interval
            with self._lock:
                self._running[saga_id] = (claim, opened)
            try:
                _, error = self.executor._drive(opened)
            finally:
                with self._lock:
                    del self._running[saga_id]
            status = opened.engine.status.value
            if error is None:
                logger.info("Saga %r ended %s.", saga_id, status)
            else:
                logger.info("Saga %r ended %s: %r", saga_id, status, error)
        except Abandoned:
            logger.info("Saga %r left at a step boundary for another worker.", saga_id)
        except Parked as parked:
            logger.info(
                "Saga %r parked: its next attempt is due in %.1fs.",
                saga_id,
                parked.due - time.time(),
            )
        except LeaseLost as error:
            logger.warning("Saga %r abandoned: %s", saga_id, error)
        except StoreError as error:
            logger.error("Saga %r stopped by a store failure: %s", saga_id, error)
        except Exception:
            # A bug, or a reporter that raised: the saga is concluded or left unfinished
            # like after a crash; the worker carries on with the next one.
            logger.exception("Saga %r: the worker caught an unexpected error.", saga_id)
        self._release(claim)

    def _let_go_of_refused(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [claim for when, claim in self._refused if when <= now]
            self._refused = [(when, claim) for when, claim in self._refused if when > now]
        for claim in due:
            self._release(claim)

    def _release(self, claim: Claim) -> None:
        try:
            self.store.release(claim)
        except StoreError as error:  # a lease then simply runs out
            logger.warning("Could not release the claim of saga %r: %s", claim.saga_id, error)
