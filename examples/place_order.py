"""Place an order: reserve stock, charge the card, ship; undo what was done when a step fails.

`make demo` runs this file. The services (inventory, payments, shipping) are in-memory
command handlers here; in production they would call your real services. The saga is the
same either way.
"""

from __future__ import annotations

import asyncio

import attrs

import declsaga
from declsaga import Command, Context, Event, Saga, action, compensates, step


class OutOfStock(Exception):
    pass


class CarrierUnavailable(Exception):
    pass


@attrs.define
class Stock:
    """An aggregate: what the warehouse holds of one product."""

    id: str
    available: int = 0


class PlaceOrder(Saga):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int
    reservation: str | None = None
    charge: str | None = None
    tracking: str | None = None

    @step(order=1)
    def reserve_stock(self, ctx: Context) -> None:
        stock = ctx.fetch(Stock(id=self.sku))
        if stock.available < self.quantity:
            raise OutOfStock(f"only {stock.available} of {self.sku} left")
        self.reservation = ctx.dispatch(
            Command("inventory.reserve", {"sku": self.sku, "quantity": self.quantity})
        )

    @compensates("reserve_stock")
    def release_stock(self, ctx: Context) -> None:
        ctx.dispatch(Command("inventory.release", {"reservation": self.reservation}))

    @step(order=2)
    async def charge_card(self, ctx: Context) -> None:
        self.charge = await ctx.dispatch_async(
            Command("payments.charge", {"order": self.order_id, "cents": self.amount_cents})
        )
        await ctx.run_async("audit")

    @compensates("charge_card")
    async def refund_card(self, ctx: Context) -> None:
        await ctx.dispatch_async(Command("payments.refund", {"charge": self.charge}))

    @action
    async def audit(self, ctx: Context) -> None:
        await ctx.publish_async(Event("order.charged", {"order": self.order_id}))

    @step(order=3)
    def ship(self, ctx: Context) -> None:
        self.tracking = ctx.dispatch(Command("shipping.ship", {"order": self.order_id}))
        ctx.publish(Event("order.shipped", {"order": self.order_id, "tracking": self.tracking}))


def payload(command: Command) -> dict[str, object]:
    """The commands of this example carry plain dicts."""
    assert isinstance(command.payload, dict)
    return command.payload


def services(
    *, carrier_up: bool
) -> tuple[declsaga.InMemoryCommandBus, declsaga.InMemoryRepository, list[str]]:
    """In-memory stand-ins for the inventory, payment and shipping services."""
    ledger: list[str] = []
    stock = declsaga.InMemoryRepository()
    stock.save(Stock(id="book-42", available=3))
    bus = declsaga.InMemoryCommandBus()

    def reserve(command: Command) -> str:
        order = payload(command)
        ledger.append(f"inventory: reserved {order['quantity']} x {order['sku']}")
        return "res-1"

    def release(command: Command) -> None:
        ledger.append(f"inventory: released {payload(command)['reservation']}")

    async def charge(command: Command) -> str:
        await asyncio.sleep(0)  # a network call in real life
        ledger.append(f"payments: charged {payload(command)['cents']} cents")
        return "ch-1"

    async def refund(command: Command) -> None:
        ledger.append(f"payments: refunded {payload(command)['charge']}")

    def ship(command: Command) -> str:
        if not carrier_up:
            raise CarrierUnavailable("the carrier's API answered 503")
        ledger.append(f"shipping: shipped {payload(command)['order']}")
        return "trk-7"

    for name, handler in [
        ("inventory.reserve", reserve),
        ("inventory.release", release),
        ("payments.charge", charge),
        ("payments.refund", refund),
        ("shipping.ship", ship),
    ]:
        bus.handle(name, handler)
    return bus, stock, ledger


def print_runs(report: declsaga.Report) -> None:
    """A reporter: every run of the saga, in the order it finished."""
    undoes = {id(run.compensated_by): run.action for run in report.compensated}
    for run in report.runs:
        outcome = "ok" if run.error is None else f"failed: {run.error!r}"
        role = f"compensation of {undoes[id(run)]}" if id(run) in undoes else "run"
        print(f"   {run.action:<14} {role:<31} {outcome}")


def place(order_id: str, *, carrier_up: bool) -> list[str]:
    """Run one order and print what happened; return the services' ledger."""
    commands, stock, ledger = services(carrier_up=carrier_up)
    events = declsaga.InMemoryEventBus()
    subscription = events.subscribe()
    executor = declsaga.Executor(
        command_bus=commands, repository=stock, event_bus=events, reporter=print_runs
    )
    saga = PlaceOrder(order_id=order_id, sku="book-42", quantity=1, amount_cents=2_500)
    print(f"\n== order {order_id} (carrier {'up' if carrier_up else 'down'})")
    try:
        executor.execute(saga)
    except CarrierUnavailable as error:
        print(f"-> rolled back after {error!r}")
    else:
        print(f"-> completed: tracking number {saga.tracking}")
    for line in ledger:
        print(f"   {line}")
    for event in subscription:
        print(f"   event {event.name} {event.data}")
    return ledger


def main() -> None:
    place("o-1", carrier_up=True)
    place("o-2", carrier_up=False)


if __name__ == "__main__":
    main()
