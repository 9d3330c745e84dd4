"""`Context`: what every action receives, its door to the rest of the saga."""

from __future__ import annotations

from asyncio import events
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import MissingBus, MissingRepository, SagaError

if TYPE_CHECKING:
    from ._components import AggregateRepository, Command, CommandBus, Event, EventBus
    from ._execution import Execution
    from ._setup import Action

__all__ = ["Context"]

T = TypeVar("T")


class Context:
    """Runs other actions by name, publishes events, dispatches commands, fetches aggregates.

    Sync actions use the plain methods, async actions the `_async` twins. A context is only
    valid while its run lasts: afterwards every call is refused.
    """

    __slots__ = ("_abandonable", "_calls", "_closed", "_execution", "_run", "action", "attempt")

    def __init__(
        self,
        execution: Execution,
        action: Action,
        run: int,
        *,
        abandonable: bool = False,
        attempt: int = 1,
    ) -> None:
        self._execution = execution
        self.action = action
        self._run = run
        # Which attempt of this run this is: 1, then 2, 3... when a retry policy runs it
        # again. The idempotency key stays the same across attempts.
        self.attempt = attempt
        self._calls = 0
        self._closed = False
        # True within a compensation: the budget may abandon this run, so nothing waits
        # for the outcome of a sync run it starts once it is cancelled.
        self._abandonable = abandonable

    def __repr__(self) -> str:
        return f"<Context saga_id={self.saga_id!r} action={self.action.name!r} run={self._run}>"

    @property
    def saga_id(self) -> str:
        """The id of this execution."""
        return self._execution.saga_id

    @property
    def idempotency_key(self) -> str:
        """A key unique to this run of this saga, for deduplicating side effects downstream."""
        return f"{self._execution.saga_id}/{self._run}"

    # -- running other actions ------------------------------------------------------------

    def run(self, name: str) -> Any:
        """Run the action `name` and return what it returned (raise what it raised)."""
        self._check_blocking("run")
        return self._execution.call_blocking(self, name)

    async def run_async(self, name: str) -> Any:
        """Run the action `name` from async code."""
        self._check_open("run_async")
        return await self._execution.call_async(self, name)

    # -- components ------------------------------------------------------------------------

    def publish(self, *events: Event) -> None:
        """Publish events on the executor's event bus."""
        self._check_blocking("publish")
        self._blocking(self._event_bus().publish(*events))

    async def publish_async(self, *events: Event) -> None:
        """Publish events on the executor's event bus, from async code."""
        self._check_open("publish_async")
        await _settle(self._event_bus().publish(*events))

    def dispatch(self, command: Command) -> Any:
        """Dispatch a command and wait for its handler; return its result, raise its error."""
        self._check_blocking("dispatch")
        return self._blocking(self._command_bus().dispatch(command))

    async def dispatch_async(self, command: Command) -> Any:
        """Dispatch a command from async code."""
        self._check_open("dispatch_async")
        return await _settle(self._command_bus().dispatch(command))

    def fetch(self, aggregate: T) -> T:
        """Load the aggregate's current state into `aggregate`, in place; return it."""
        self._check_blocking("fetch")
        self._blocking(self._repository().fetch(aggregate))
        return aggregate

    async def fetch_async(self, aggregate: T) -> T:
        """Load the aggregate's current state into `aggregate` from async code; return it."""
        self._check_open("fetch_async")
        await _settle(self._repository().fetch(aggregate))
        return aggregate

    # -- guards ----------------------------------------------------------------------------

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise SagaError(
                f"ctx.{method}() was called after the run of action {self.action.name!r} "
                f"ended (saga {self.saga_id!r}); a context is valid only during its run."
            )
        if self._execution.ended:
            # A run left behind by the saga (under an abandoned compensator, or started
            # without being awaited) must not act once the outcome is decided.
            raise SagaError(
                f"ctx.{method}() was called by action {self.action.name!r} after saga "
                f"{self.saga_id!r} ended; a context is valid only during its run."
            )

    def _check_blocking(self, method: str) -> None:
        self._check_open(method)
        # A blocking call on a thread whose event loop is running would deadlock that loop.
        if events._get_running_loop() is not None:
            raise SagaError(
                f"ctx.{method}() blocks, but action {self.action.name!r} runs on an event "
                f"loop: use 'await ctx.{method}_async(...)' instead."
            )

    def _blocking(self, outcome: object) -> Any:
        if isawaitable(outcome):
            return self._execution.block_on(outcome)
        return outcome

    def _event_bus(self) -> EventBus:
        bus = self._execution.event_bus
        if bus is None:
            raise MissingBus("event", self.action.name)
        return bus

    def _command_bus(self) -> CommandBus:
        bus = self._execution.command_bus
        if bus is None:
            raise MissingBus("command", self.action.name)
        return bus

    def _repository(self) -> AggregateRepository:
        repository = self._execution.repository
        if repository is None:
            raise MissingRepository(self.action.name)
        return repository


async def _settle(outcome: object) -> Any:
    """Await what an async component returned; a sync component's value passes through."""
    if isawaitable(outcome):
        return await outcome
    return outcome
