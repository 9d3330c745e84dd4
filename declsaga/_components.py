"""Messages, the component protocols an action can use, and their in-memory implementations."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import types
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import attrs

from ._errors import AggregateNotFound, HandlerNotFound, UsageError, describe

__all__ = [
    "AggregateRepository",
    "Command",
    "CommandBus",
    "Event",
    "EventBus",
    "InMemoryCommandBus",
    "InMemoryEventBus",
    "InMemoryRepository",
    "Subscription",
]


def _new_id() -> str:
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(UTC)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what} must be a non-empty string, got {describe(name)}.")
    return name


def _check_message(kind: str, name: object, id: object, aggregate: object) -> None:
    _check_name(name, f"A {kind} name" if kind == "command" else f"An {kind} name")
    # A string id, not a UUID: ids given by the caller (an outbox's deterministic ids,
    # a broker's message ids) need not be UUIDs, and strings survive JSON as they are.
    _check_name(id, f"The id of {kind} {name!r}")
    if aggregate is not None and not (isinstance(aggregate, tuple) and len(aggregate) == 2):
        raise UsageError(
            f"The aggregate of {kind} {name!r} must be an (aggregate_name, aggregate_id) "
            f"pair or None, got {describe(aggregate)}."
        )


@attrs.frozen
class Event:
    """Something that happened: `name`, `data`, a unique string `id`, an aware UTC `time`."""

    name: str
    data: object = None
    id: str = attrs.field(kw_only=True, factory=_new_id)
    time: datetime = attrs.field(kw_only=True, factory=_now)
    aggregate: tuple[str, object] | None = attrs.field(kw_only=True, default=None)

    def __attrs_post_init__(self) -> None:
        _check_message("event", self.name, self.id, self.aggregate)
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise UsageError(
                f"The time of event {self.name!r} must be an aware datetime, "
                f"got {describe(self.time)}."
            )


@attrs.frozen
class Command:
    """A request to do something: `name`, `payload` and a unique string `id`."""

    name: str
    payload: object = None
    id: str = attrs.field(kw_only=True, factory=_new_id)
    aggregate: tuple[str, object] | None = attrs.field(kw_only=True, default=None)

    def __attrs_post_init__(self) -> None:
        _check_message("command", self.name, self.id, self.aggregate)


# The protocols admit sync and async implementations alike: a plain method returning
# None and an `async def` (returning a coroutine, an Awaitable) both match these return
# types. The caller (Context) awaits whatever awaitable comes back.


@runtime_checkable
class EventBus(Protocol):
    """Publishes events."""

    def publish(self, *events: Event) -> Awaitable[None] | None: ...


@runtime_checkable
class CommandBus(Protocol):
    """Dispatches a command to its handler and returns the handler's result."""

    def dispatch(self, command: Command) -> object | Awaitable[object]: ...


@runtime_checkable
class AggregateRepository(Protocol):
    """Loads an aggregate's current state into the given object."""

    # Any, not object: a repository typed for its own aggregate class still matches.
    def fetch(self, aggregate: Any) -> Awaitable[None] | None: ...


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # it may have been cancelled meanwhile
        waiter.set_result(None)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        # A closed loop raises RuntimeError: nobody can be waiting on it any more.
        with contextlib.suppress(RuntimeError):
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)


class Subscription:
    """Events of an `InMemoryEventBus` published since `subscribe()`, queued until read.

    `for event in sub` yields and removes the events received so far, then stops.
    `async for event in sub` waits for each next event, and ends once `close()` was called
    and the events received before it were read. Usable as a (async) context manager.
    """

    __slots__ = ("__weakref__", "_bus", "_closed", "_events", "_lock", "_names", "_waiters")

    def __init__(self, bus: InMemoryEventBus, names: frozenset[str]) -> None:
        self._names = names
        self._bus = bus
        self._lock = threading.Lock()
        self._events: deque[Event] = deque()
        self._closed = False
        # One future per waiting consumer, each on its own loop: no loop is bound to the
        # subscription, so it can be consumed from several loops, one after the other.
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def names(self) -> frozenset[str]:
        """The event names this subscription receives; empty for every event."""
        return self._names

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving events and end async iteration; closing again does nothing."""
        # Leave the bus before taking our own lock: publish holds the bus lock while it
        # takes ours, so the opposite nesting could deadlock.
        self._bus._unsubscribe(self)
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def _deliver(self, events: tuple[Event, ...]) -> None:
        with self._lock:
            if self._closed:
                return
            self._events.extend(e for e in events if not self._names or e.name in self._names)
            if not self._events or not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def __iter__(self) -> Iterator[Event]:
        with self._lock:
            count = len(self._events)
        # Only what was there when iteration began: a busy publisher cannot make it endless.
        for _ in range(count):
            with self._lock:
                if not self._events:  # another consumer took them
                    return
                event = self._events.popleft()
            yield event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                if self._closed:
                    raise StopAsyncIteration
                # Registered under the lock that _deliver takes: no wake-up can be missed.
                waiter = loop.create_future()
                self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription names={sorted(self._names)!r} {state} pending={len(self._events)}>"


class InMemoryEventBus:
    """An embedded, thread-safe `EventBus`: `publish` delivers to every open subscription."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak references: a subscription dropped without close() is not kept (and fed)
        # forever. Dead references are pruned under the lock, never from a GC callback.
        self._subscriptions: dict[int, weakref.ref[Subscription]] = {}

    def subscribe(self, *names: str) -> Subscription:
        """A subscription to the events published from now on with one of `names` (or all)."""
        for name in names:
            _check_name(name, "An event name to subscribe to")
        subscription = Subscription(self, frozenset(names))
        with self._lock:
            self._subscriptions[id(subscription)] = weakref.ref(subscription)
        return subscription

    def publish(self, *events: Event) -> None:
        """Deliver `events` to the open subscriptions, in order; only `Event` values."""
        for event in events:
            if not isinstance(event, Event):
                raise UsageError(f"publish() takes Event values, got {describe(event)}.")
        if not events:
            return
        # Delivering under the bus lock gives every subscriber the same order of events,
        # even with several publishing threads; delivery only queues and schedules.
        with self._lock:
            for key, ref in list(self._subscriptions.items()):
                subscription = ref()
                if subscription is None:
                    del self._subscriptions[key]
                else:
                    subscription._deliver(events)

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            ref = self._subscriptions.get(id(subscription))
            if ref is not None and ref() is subscription:
                del self._subscriptions[id(subscription)]


CommandHandler = Callable[[Command], object]


class InMemoryCommandBus:
    """An embedded `CommandBus`: one handler per command name, called by `dispatch`.

    `dispatch` returns exactly what the handler returns: for an `async def` handler, the
    coroutine, which the caller awaits (`Context.dispatch`/`dispatch_async` do).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[str, CommandHandler] = {}

    def handle(self, name: str, handler: CommandHandler) -> None:
        """Register `handler(command)` for commands called `name`, replacing any earlier one."""
        _check_name(name, "A command name")
        if not callable(handler):
            raise UsageError(
                f"The handler of command {name!r} must be callable, got {describe(handler)}."
            )
        with self._lock:
            self._handlers[name] = handler

    def dispatch(self, command: Command) -> object:
        """Call the handler of `command` and return its result; its errors propagate as is."""
        if not isinstance(command, Command):
            raise UsageError(f"dispatch() takes a Command, got {describe(command)}.")
        with self._lock:
            handler = self._handlers.get(command.name)
        if handler is None:
            raise HandlerNotFound(command.name)
        return handler(command)


def _slot_descriptors(cls: type) -> list[types.MemberDescriptorType]:
    """The slot descriptors of `cls` and its bases (private names come mangled)."""
    found: list[types.MemberDescriptorType] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            name, owner = slot, klass.__name__.lstrip("_")
            if name.startswith("__") and not name.endswith("__") and owner:
                name = f"_{owner}{name}"  # a private slot is stored under its mangled name
            descriptor = klass.__dict__.get(name)
            if isinstance(descriptor, types.MemberDescriptorType):
                found.append(descriptor)
    return found


def _state_of(aggregate: object) -> dict[str, object]:
    # Read and written through the instance __dict__ and the slot descriptors, never via
    # getattr/setattr: that skips __getattr__ fallbacks (attrs' slotted cached_property)
    # and __setattr__ guards (frozen classes), and it covers attrs classes of either kind
    # (their fields are slots or __dict__ entries) and plain classes alike.
    state: dict[str, object] = {}
    for descriptor in _slot_descriptors(type(aggregate)):
        try:
            state[descriptor.__name__] = descriptor.__get__(aggregate, type(aggregate))
        except AttributeError:  # an unset slot is no state
            continue
    state.update(getattr(aggregate, "__dict__", {}))
    return state


def _restore(aggregate: object, state: dict[str, object]) -> None:
    slots = {d.__name__: d for d in _slot_descriptors(type(aggregate))}
    instance_dict = getattr(aggregate, "__dict__", None)
    for name, value in state.items():
        if name in slots:
            slots[name].__set__(aggregate, value)
        elif instance_dict is not None:
            instance_dict[name] = value
        else:  # the class changed since the save and lost this attribute
            object.__setattr__(aggregate, name, value)


class InMemoryRepository:
    """An embedded, thread-safe `AggregateRepository` keyed by aggregate type and `id`.

    `save` and `fetch` both deep-copy, so the store never shares state with live objects.
    `fetch` overwrites the stored attributes and leaves any other attribute as it is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[type, object], dict[str, object]] = {}

    @staticmethod
    def _key(aggregate: object, api: str) -> tuple[type, object]:
        if isinstance(aggregate, type) or not hasattr(aggregate, "id"):
            raise UsageError(
                f"{api}() takes an aggregate, an object with an id attribute, "
                f"got {describe(aggregate)}."
            )
        key = (type(aggregate), aggregate.id)
        try:
            hash(key)
        except TypeError:
            raise UsageError(
                f"The id of aggregate {type(aggregate).__qualname__} must be hashable, "
                f"got {describe(aggregate.id)}."
            ) from None
        return key

    def save(self, aggregate: object) -> None:
        """Store a deep copy of the aggregate's state, replacing what was stored before."""
        key = self._key(aggregate, "save")
        state = copy.deepcopy(_state_of(aggregate))  # outside the lock: it may be slow
        with self._lock:
            self._states[key] = state

    def fetch(self, aggregate: object) -> None:
        """Update `aggregate` in place from a deep copy of its stored state."""
        key = self._key(aggregate, "fetch")
        with self._lock:
            stored = self._states.get(key)
        if stored is None:
            raise AggregateNotFound(key[0].__qualname__, key[1])
        # A stored state is replaced on save, never mutated, so it is copied unlocked.
        _restore(aggregate, copy.deepcopy(stored))
