"""Place an order: reserve stock, charge the card, ship; undo what was done when a step fails.

`make demo` runs this file. It shows, on the embedded SQLite store:

1. an order that completes, and one whose last step fails and is rolled back;
2. an order whose process is killed (SIGKILL) in the middle of a step, and a second
   process that recovers it from the journal and finishes it.

The services (inventory, payments, shipping) are in-memory command handlers here; in
production they would call your real services. The saga is the same either way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


class PlaceOrder(Saga, name="place-order"):
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
        # The idempotency key is the same if this run executes again after a crash, so a
        # real carrier API can recognise the retry.
        self.tracking = ctx.dispatch(
            Command("shipping.ship", {"order": self.order_id, "key": ctx.idempotency_key})
        )
        ctx.publish(Event("order.shipped", {"order": self.order_id, "tracking": self.tracking}))


def payload(command: Command) -> dict[str, object]:
    """The commands of this example carry plain dicts."""
    assert isinstance(command.payload, dict)
    return command.payload


def services(database: Path, *, carrier: str) -> declsaga.Executor:
    """An executor wired to in-memory stand-ins for the three services.

    `carrier`: "up", "down" (shipping fails), or "hangs" (shipping never answers).
    """
    stock = declsaga.InMemoryRepository()
    stock.save(Stock(id="book-42", available=3))
    bus = declsaga.InMemoryCommandBus()

    def reserve(command: Command) -> str:
        order = payload(command)
        say(f"inventory: reserved {order['quantity']} x {order['sku']}")
        return "res-1"

    def release(command: Command) -> None:
        say(f"inventory: released {payload(command)['reservation']}")

    async def charge(command: Command) -> str:
        await asyncio.sleep(0)  # a network call in real life
        say(f"payments: charged {payload(command)['cents']} cents")
        return "ch-1"

    async def refund(command: Command) -> None:
        say(f"payments: refunded {payload(command)['charge']}")

    def ship(command: Command) -> str:
        order = payload(command)
        say(f"shipping: calling the carrier for {order['order']} (key {order['key']})")
        if carrier == "down":
            raise CarrierUnavailable("the carrier's API answered 503")
        if carrier == "hangs":
            time.sleep(60)  # the parent kills this process meanwhile
        say(f"shipping: shipped {order['order']}")
        return "trk-7"

    for name, handler in [
        ("inventory.reserve", reserve),
        ("inventory.release", release),
        ("payments.charge", charge),
        ("payments.refund", refund),
        ("shipping.ship", ship),
    ]:
        bus.handle(name, handler)
    return declsaga.Executor(
        command_bus=bus,
        repository=stock,
        event_bus=declsaga.InMemoryEventBus(),
        reporter=print_runs,
        store=declsaga.SQLiteStore(database),
    )


def say(line: str) -> None:
    print(f"   [pid {os.getpid()}] {line}", flush=True)


def print_runs(report: declsaga.Report) -> None:
    """A reporter: every run of the saga, in the order it finished."""
    undoes = {id(run.compensated_by): run.action for run in report.compensated}
    for run in report.runs:
        outcome = "ok" if run.error is None else f"failed: {run.error!r}"
        role = f"compensation of {undoes[id(run)]}" if id(run) in undoes else "run"
        print(f"   {run.action:<14} {role:<31} {outcome}", flush=True)


def print_journal(database: Path, saga_id: str) -> None:
    """The stored journal, an entry a line; field values shown where they changed."""
    with declsaga.SQLiteStore(database) as store:
        record, stored = store.get(saga_id), store.load(saga_id)
    assert record is not None and stored is not None
    print(f"   journal of {saga_id} (status {record.status}):")
    fields: dict[str, object] = dict(stored.header.fields)  # the initial fields
    for entry in record.journal:
        details = [
            f"{key}={entry[key]}" for key in ("run", "action", "role", "status") if key in entry
        ]
        changed = entry.get("fields", {})
        details += [
            f"{name}={value!r}"
            for name, value in changed.items()
            if fields.get(name, value) != value
        ]
        fields.update(changed)
        print(f"     {entry['kind']:<17} {' '.join(details)}")


def place(database: Path, order_id: str, *, carrier: str) -> None:
    """Run one order in this process and say how it ended."""
    saga = PlaceOrder(order_id=order_id, sku="book-42", quantity=1, amount_cents=2_500)
    try:
        services(database, carrier=carrier).execute(saga, saga_id=f"order-{order_id}")
    except CarrierUnavailable as error:
        print(f"-> rolled back after {error!r}")
    else:
        print(f"-> completed: tracking number {saga.tracking}")


def crash_and_recover(database: Path) -> None:
    saga_id = "order-o-3"
    child = subprocess.Popen(
        [sys.executable, __file__, str(database), "place", "o-3", "hangs"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    for line in child.stdout:  # wait until the child is inside the ship step
        print(line, end="")
        if "calling the carrier" in line:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    print(f"-> process {child.pid} killed with SIGKILL in the middle of 'ship'")
    print_journal(database, saga_id)
    print("\n== a new process recovers every unfinished saga")
    subprocess.run([sys.executable, __file__, str(database), "recover"], check=True)
    print_journal(database, saga_id)


def recover(database: Path) -> None:
    for recovered in services(database, carrier="up").recover():
        outcome = "completed" if recovered.error is None else repr(recovered.error)
        print(f"-> recovered {recovered.saga_id}: {recovered.status} ({outcome})")


def main(database: Path) -> None:
    print(f"sagas are stored in {database}\n")
    print("== order o-1: everything works")
    place(database, "o-1", carrier="up")
    print("\n== order o-2: the carrier is down, so the order is rolled back")
    place(database, "o-2", carrier="down")
    print("\n== order o-3: the process dies while shipping")
    crash_and_recover(database)


if __name__ == "__main__":
    if len(sys.argv) > 2:  # the child processes of crash_and_recover()
        if sys.argv[2] == "place":
            place(Path(sys.argv[1]), sys.argv[3], carrier=sys.argv[4])
        else:
            recover(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as directory:
            main(Path(directory) / "sagas.db")
