"""Event and Command values, the component protocols and the in-memory components."""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import uuid
import weakref
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import attrs
import pytest

from declsaga._components import (
    AggregateRepository,
    Command,
    CommandBus,
    Event,
    EventBus,
    InMemoryCommandBus,
    InMemoryEventBus,
    InMemoryRepository,
    Subscription,
)
from declsaga._errors import AggregateNotFound, HandlerNotFound, SagaError, UsageError

# -- Event and Command ----------------------------------------------------------------


def test_event_defaults() -> None:
    before = datetime.now(UTC)
    first, second = Event("placed"), Event("placed")
    after = datetime.now(UTC)
    assert first.data is None
    assert first.aggregate is None
    assert isinstance(first.id, str)
    assert uuid.UUID(first.id).version == 4
    assert first.id != second.id
    assert first.time.utcoffset() == timedelta(0)
    assert before <= first.time <= after


def test_command_defaults() -> None:
    first, second = Command("reserve"), Command("reserve")
    assert first.payload is None
    assert first.aggregate is None
    assert uuid.UUID(first.id).version == 4
    assert first.id != second.id


def test_messages_keep_given_values_and_compare_by_value() -> None:
    when = datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    event = Event("placed", {"n": 1}, id="e-1", time=when, aggregate=("Order", "o-1"))
    assert (event.name, event.data, event.id, event.time) == ("placed", {"n": 1}, "e-1", when)
    assert event.aggregate == ("Order", "o-1")
    assert event == Event("placed", {"n": 1}, id="e-1", time=when, aggregate=("Order", "o-1"))
    command = Command("reserve", 3, id="c-1", aggregate=("Stock", 7))
    assert (command.name, command.payload, command.id, command.aggregate) == (
        "reserve",
        3,
        "c-1",
        ("Stock", 7),
    )


@pytest.mark.parametrize("message", [Event("placed"), Command("reserve")])
def test_messages_are_frozen(message: Event | Command) -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        message.name = "other"  # type: ignore[misc]


def test_id_time_and_aggregate_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Event("placed", None, "e-1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Command("reserve", None, "c-1")  # type: ignore[call-arg]


_NAME = "must be a non-empty string, got"
_PAIR = r"must be an \(aggregate_name, aggregate_id\) pair or None, got"


@pytest.mark.parametrize(
    ("cls", "args", "kwargs", "message"),
    [
        (Event, ("",), {}, rf"An event name {_NAME} '' \(str\)\."),
        (Event, (3,), {}, rf"An event name {_NAME} 3 \(int\)\."),
        (Command, (None,), {}, rf"A command name {_NAME} None \(NoneType\)\."),
        (Event, ("placed",), {"id": ""}, rf"The id of event 'placed' {_NAME} '' \(str\)\."),
        (
            Command,
            ("reserve",),
            {"id": uuid.UUID(int=1)},
            rf"The id of command 'reserve' {_NAME} "
            r"UUID\('00000000-0000-0000-0000-000000000001'\) \(UUID\)\.",
        ),
        (
            Event,
            ("placed",),
            {"aggregate": ("Order",)},
            rf"The aggregate of event 'placed' {_PAIR} \('Order',\) \(tuple\)\.",
        ),
        (
            Command,
            ("reserve",),
            {"aggregate": ["Stock", 1]},
            rf"The aggregate of command 'reserve' {_PAIR} \['Stock', 1\] \(list\)\.",
        ),
        (
            Event,
            ("placed",),
            {"time": datetime(2024, 1, 1)},  # naive on purpose
            r"The time of event 'placed' must be an aware datetime, "
            r"got datetime\.datetime\(2024, 1, 1, 0, 0\) \(datetime\)\.",
        ),
    ],
)
def test_message_validation(
    cls: type[Event | Command], args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=f"^{message}$"):
        cls(*args, **kwargs)


# -- InMemoryEventBus -----------------------------------------------------------------


def test_subscription_receives_only_events_published_after_it() -> None:
    bus = InMemoryEventBus()
    early = Event("a")
    bus.publish(early)
    subscription = bus.subscribe()
    late = Event("b")
    bus.publish(late)
    assert list(subscription) == [late]


def test_subscription_filters_by_name() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe("a", "c")
    events = [Event("a"), Event("b"), Event("c"), Event("a")]
    bus.publish(*events)
    assert list(subscription) == [events[0], events[2], events[3]]


def test_iteration_drains_then_stops() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    first, second, third = Event("1"), Event("2"), Event("3")
    bus.publish(first, second)
    iterator = iter(subscription)
    assert next(iterator) == first
    bus.publish(third)  # arrived during the iteration: left for the next one
    assert list(iterator) == [second]
    assert list(subscription) == [third]
    assert list(subscription) == []


def test_iteration_stopped_early_leaves_the_rest() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    events = [Event("1"), Event("2"), Event("3")]
    bus.publish(*events)
    for _event in subscription:
        break
    assert list(subscription) == events[1:]


def test_every_subscriber_gets_every_event() -> None:
    bus = InMemoryEventBus()
    subscriptions = [bus.subscribe(), bus.subscribe(), bus.subscribe("x")]
    events = [Event("x"), Event("y")]
    bus.publish(*events)
    assert [list(s) for s in subscriptions] == [events, events, events[:1]]


def test_publish_refuses_non_events_and_delivers_none_of_the_batch() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    with pytest.raises(UsageError, match=r"^publish\(\) takes Event values, got 'x' \(str\)\.$"):
        bus.publish(Event("ok"), "x")  # type: ignore[arg-type]
    assert list(subscription) == []


def test_subscribe_refuses_bad_names() -> None:
    with pytest.raises(
        UsageError,
        match=r"^An event name to subscribe to must be a non-empty string, got '' \(str\)\.$",
    ):
        InMemoryEventBus().subscribe("a", "")


def test_close_unsubscribes_and_is_idempotent() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    kept = Event("kept")
    bus.publish(kept)
    subscription.close()
    subscription.close()
    assert bus._subscriptions == {}  # a closed subscription costs the bus nothing
    bus.publish(Event("lost"))
    assert subscription.closed
    assert list(subscription) == [kept]  # what arrived before close is still readable


def test_subscription_is_a_context_manager() -> None:
    bus = InMemoryEventBus()
    with bus.subscribe() as subscription:
        closed_inside = subscription.closed
    assert not closed_inside
    assert subscription.closed
    bus.publish(Event("after"))
    assert list(subscription) == []


def test_bus_does_not_keep_dropped_subscriptions_alive() -> None:
    bus = InMemoryEventBus()
    reference = weakref.ref(bus.subscribe())
    gc.collect()
    assert reference() is None
    bus.publish(Event("x"))  # prunes the dead entry without error


def test_async_iteration_waits_for_an_event_from_another_thread() -> None:
    bus = InMemoryEventBus()
    event = Event("x")

    async def main() -> list[Event]:
        subscription = bus.subscribe()
        received: list[Event] = []

        async def consume() -> None:
            async for item in subscription:
                received.append(item)
                subscription.close()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert not task.done()  # it waits: nothing was published yet
        await asyncio.to_thread(bus.publish, event)
        await asyncio.wait_for(task, 5)
        return received

    assert asyncio.run(main()) == [event]


def test_async_iteration_ends_after_close_from_another_thread() -> None:
    bus = InMemoryEventBus()
    events = [Event("1"), Event("2")]

    async def main() -> list[Event]:
        subscription = bus.subscribe()
        bus.publish(*events)

        async def consume() -> list[Event]:
            return [item async for item in subscription]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert not task.done()
        await asyncio.to_thread(subscription.close)
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) == events


def test_async_iteration_of_a_closed_subscription_ends_at_once() -> None:
    async def main() -> list[Event]:
        async with InMemoryEventBus().subscribe() as subscription:
            pass
        return [item async for item in subscription]

    assert asyncio.run(main()) == []


def test_a_subscription_serves_one_loop_after_another() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()
    events = [Event("1"), Event("2")]

    async def next_event(event: Event) -> Event:
        waiting = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(bus.publish, event)
        return await asyncio.wait_for(waiting, 5)

    assert [asyncio.run(next_event(e)) for e in events] == events


def test_a_cancelled_async_wait_loses_no_event() -> None:
    bus = InMemoryEventBus()
    subscription = bus.subscribe()

    async def main() -> None:
        waiting = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert subscription._waiters == []  # the cancelled wait left nothing behind
    event = Event("x")
    bus.publish(event)
    assert list(subscription) == [event]


def test_concurrent_publishers_reach_every_subscriber_in_one_order() -> None:
    bus = InMemoryEventBus()
    subscriptions = [bus.subscribe(), bus.subscribe()]

    def publish(t: int) -> None:
        for i in range(200):
            bus.publish(Event(f"{t}", i))

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = (list(s) for s in subscriptions)
    assert first == second
    assert len(first) == 8 * 200
    for t in range(8):  # each publisher's events arrive in the order it published them
        assert [e.data for e in first if e.name == f"{t}"] == list(range(200))


# -- InMemoryCommandBus ---------------------------------------------------------------


def test_dispatch_calls_the_handler_and_returns_its_result() -> None:
    bus = InMemoryCommandBus()
    seen: list[Command] = []

    def reserve(command: Command) -> str:
        seen.append(command)
        return f"r-{command.payload}"

    bus.handle("reserve", reserve)
    command = Command("reserve", 7)
    assert bus.dispatch(command) == "r-7"
    assert seen == [command]


def test_dispatch_raises_the_handlers_own_error() -> None:
    error = ValueError("no stock")

    def fail(command: Command) -> None:
        raise error

    bus = InMemoryCommandBus()
    bus.handle("reserve", fail)
    with pytest.raises(ValueError) as raised:
        bus.dispatch(Command("reserve"))
    assert raised.value is error


def test_a_later_handler_replaces_the_earlier_one() -> None:
    bus = InMemoryCommandBus()
    bus.handle("reserve", lambda command: "first")
    bus.handle("reserve", lambda command: "second")
    assert bus.dispatch(Command("reserve")) == "second"


def test_dispatch_without_handler() -> None:
    bus = InMemoryCommandBus()
    bus.handle("other", lambda command: None)
    with pytest.raises(
        HandlerNotFound, match=r"^No handler is registered for command 'reserve'\.$"
    ) as raised:
        bus.dispatch(Command("reserve"))
    assert isinstance(raised.value, LookupError)
    assert isinstance(raised.value, SagaError)


def test_an_async_handler_returns_an_awaitable() -> None:
    async def reserve(command: Command) -> str:
        await asyncio.sleep(0)
        return f"r-{command.payload}"

    bus = InMemoryCommandBus()
    bus.handle("reserve", reserve)
    result = bus.dispatch(Command("reserve", 7))
    assert asyncio.iscoroutine(result)

    async def main() -> object:
        return await result

    assert asyncio.run(main()) == "r-7"


def test_command_bus_refuses_bad_arguments() -> None:
    bus = InMemoryCommandBus()
    with pytest.raises(
        UsageError, match=r"^The handler of command 'reserve' must be callable, got 3 \(int\)\.$"
    ):
        bus.handle("reserve", 3)  # type: ignore[arg-type]
    with pytest.raises(
        UsageError, match=r"^A command name must be a non-empty string, got '' \(str\)\.$"
    ):
        bus.handle("", lambda command: None)
    with pytest.raises(
        UsageError, match=r"^dispatch\(\) takes a Command, got 'reserve' \(str\)\.$"
    ):
        bus.dispatch("reserve")  # type: ignore[arg-type]


# -- InMemoryRepository ---------------------------------------------------------------


class Order:
    def __init__(self, id: str, lines: list[str] | None = None) -> None:
        self.id = id
        self.lines = lines if lines is not None else []


@attrs.define
class Stock:
    totals_computed: ClassVar[list[int]] = []
    id: int
    items: dict[str, int] = attrs.field(factory=dict)

    @functools.cached_property
    def total(self) -> int:
        total = sum(self.items.values())
        self.totals_computed.append(total)
        return total


@attrs.frozen
class Price:
    id: int
    amount: int


class Base:
    __slots__ = ("id", "owner")


class Account(Base):
    __slots__ = ("__secret", "balance")

    def __init__(self, id: str, balance: int = 0, secret: str = "", owner: str = "") -> None:
        self.id = id
        self.owner = owner
        self.balance = balance
        self.__secret = secret

    @property
    def secret(self) -> str:
        return self.__secret


def test_save_stores_a_deep_copy_and_fetch_updates_in_place() -> None:
    repository = InMemoryRepository()
    order = Order("o-1", ["a"])
    repository.save(order)
    order.lines.append("changed after save")
    fetched = Order("o-1")
    repository.fetch(fetched)
    assert fetched.lines == ["a"]
    fetched.lines.append("changed after fetch")
    again = Order("o-1")
    repository.fetch(again)
    assert again.lines == ["a"]


def test_save_replaces_the_stored_state() -> None:
    repository = InMemoryRepository()
    repository.save(Order("o-1", ["a"]))
    repository.save(Order("o-1", ["b"]))
    order = Order("o-1")
    repository.fetch(order)
    assert order.lines == ["b"]


def test_fetch_of_an_unknown_aggregate() -> None:
    repository = InMemoryRepository()
    repository.save(Order("o-1"))
    with pytest.raises(
        AggregateNotFound, match=r"^No Order aggregate with id 'o-2' is stored\.$"
    ) as raised:
        repository.fetch(Order("o-2"))
    assert isinstance(raised.value, LookupError)


def test_aggregates_are_keyed_by_type_and_id() -> None:
    repository = InMemoryRepository()
    repository.save(Stock(1, {"apple": 3}))
    with pytest.raises(AggregateNotFound, match=r"^No Price aggregate with id 1 is stored\.$"):
        repository.fetch(Price(1, 0))
    repository.save(Price(1, 99))
    stock, price = Stock(1), Price(1, 0)
    repository.fetch(stock)
    repository.fetch(price)
    assert (stock.items, price.amount) == ({"apple": 3}, 99)


def test_slotted_attrs_classes_frozen_ones_included() -> None:
    repository = InMemoryRepository()
    stock = Stock(1, {"apple": 3})
    Stock.totals_computed.clear()
    repository.save(stock)
    stock.items["apple"] = 0
    repository.fetch(stock)
    assert stock.items == {"apple": 3}
    assert Stock.totals_computed == []  # an unset cached property is not computed to save it
    assert stock.total == 3
    repository.save(Price(2, 10))
    price = Price(2, 0)
    repository.fetch(price)
    assert price == Price(2, 10)


def test_plain_slotted_classes_across_the_mro() -> None:
    repository = InMemoryRepository()
    repository.save(Account("a-1", 50, "s3cr3t", "ann"))
    account = Account("a-1")
    repository.fetch(account)
    assert (account.id, account.owner, account.balance) == ("a-1", "ann", 50)
    assert account.secret == "s3cr3t"


def test_repository_refuses_what_is_not_an_aggregate() -> None:
    repository = InMemoryRepository()
    with pytest.raises(
        UsageError,
        match=r"^save\(\) takes an aggregate, an object with an id attribute, "
        r"got 3 \(int\)\.$",
    ):
        repository.save(3)
    with pytest.raises(
        UsageError,
        match=r"^fetch\(\) takes an aggregate, an object with an id attribute, "
        r"got <class '.*Order'> \(type\)\.$",
    ):
        repository.fetch(Order)
    with pytest.raises(
        UsageError,
        match=r"^The id of aggregate Order must be hashable, got \[1\] \(list\)\.$",
    ):
        repository.save(Order([1]))  # type: ignore[arg-type]


def test_repository_is_thread_safe() -> None:
    repository = InMemoryRepository()

    def work(n: int) -> None:
        for i in range(100):
            repository.save(Order(f"o-{n}", [str(i)]))
            repository.fetch(Order(f"o-{n}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(8):
        order = Order(f"o-{n}")
        repository.fetch(order)
        assert order.lines == ["99"]


# -- Protocols ------------------------------------------------------------------------


class AsyncEventBus:
    async def publish(self, *events: Event) -> None:
        pass


class AsyncCommandBus:
    async def dispatch(self, command: Command) -> object:
        return command.payload


class AsyncRepository:
    def fetch(self, aggregate: Order) -> Awaitable[None]:
        return asyncio.sleep(0)


def test_implementations_satisfy_the_protocols() -> None:
    # The annotations are the static half of this test (mypy --strict, sync and async).
    event_buses: list[EventBus] = [InMemoryEventBus(), AsyncEventBus()]
    command_buses: list[CommandBus] = [InMemoryCommandBus(), AsyncCommandBus()]
    repositories: list[AggregateRepository] = [InMemoryRepository(), AsyncRepository()]
    assert all(isinstance(bus, EventBus) for bus in event_buses)
    assert all(isinstance(bus, CommandBus) for bus in command_buses)
    assert all(isinstance(repository, AggregateRepository) for repository in repositories)
    assert not isinstance(InMemoryEventBus(), CommandBus)
    assert not isinstance(InMemoryCommandBus(), AggregateRepository)
    assert not isinstance(object(), EventBus)
    assert isinstance(InMemoryEventBus().subscribe(), Subscription)
