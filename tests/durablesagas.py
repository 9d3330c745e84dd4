"""Module-level definitions for the durable-execution suite (tests/test_durable.py).

Recorded errors come back as their own class only when that class is found by module and
qualified name, and a child process finds sagas by their registered name: both need
definitions at module level. Actions log to `LOG` (cleared by the suite's fixtures).
"""

from __future__ import annotations

import os
import sys

from declsaga import Context, Saga, action, compensates, step

LOG: list[str] = []

# The child process of the crash test dies in this step when the variable names it.
CRASH_ENV = "DURABLESAGAS_CRASH_IN"


class OutOfStock(Exception):
    """Rebuilt as itself from a journal: simple args that give the same message."""


class CardDeclined(Exception):
    """Not rebuildable: `cls(*args)` gives another message, so it comes back as a
    RecordedError."""

    def __init__(self, code: str) -> None:
        super().__init__(f"the card was declined ({code})")


class PlaceOrder(Saga, name="durablesagas.place-order"):
    order_id: str = ""
    amount: int = 0
    reserved: bool = False
    charged: int = 0

    @step(order=1)
    def reserve(self, ctx: Context) -> str:
        LOG.append(f"reserve {ctx.idempotency_key}")
        self.reserved = True
        return f"r-{self.order_id}"

    @compensates("reserve")
    def release(self, ctx: Context) -> None:
        LOG.append(f"release {ctx.idempotency_key}")
        self.reserved = False

    @step(order=2)
    def charge(self, ctx: Context) -> int:
        LOG.append(f"charge {ctx.idempotency_key}")
        print(f"charging {ctx.idempotency_key}", flush=True)  # the crash test waits for it
        if os.environ.get(CRASH_ENV) == "charge":
            sys.stdin.read()  # held here until the parent kills this process
        self.charged = self.amount
        return self.amount

    @step(order=3)
    def ship(self, ctx: Context) -> None:
        LOG.append(f"ship {ctx.idempotency_key}")
        if self.amount > 100:
            raise OutOfStock(f"order {self.order_id}")


class Trip(Saga):
    """Three steps, two of them compensable; the middle one makes two nested calls, the
    second of which fails and is caught; `fail_car` makes the last step fail."""

    budget: int = 1000
    booked: tuple[str, ...] = ()
    fail_car: bool = False

    @step(order=1)
    def flight(self, ctx: Context) -> dict[str, str]:
        LOG.append(f"flight {ctx.idempotency_key}")
        self.booked += ("flight",)
        return {"seat": "12A"}

    @compensates("flight")
    def cancel_flight(self, ctx: Context) -> None:
        LOG.append(f"cancel_flight {ctx.idempotency_key}")
        self.booked = tuple(item for item in self.booked if item != "flight")

    @step(order=2)
    def hotel(self, ctx: Context) -> int:
        LOG.append(f"hotel {ctx.idempotency_key}")
        nights = ctx.run("quote")
        try:
            ctx.run("upgrade")
        except OutOfStock:
            LOG.append("no upgrade")
        self.booked += ("hotel",)
        return int(nights)

    @compensates("hotel")
    def cancel_hotel(self, ctx: Context) -> None:
        LOG.append(f"cancel_hotel {ctx.idempotency_key}")
        self.booked = tuple(item for item in self.booked if item != "hotel")
        self.budget += 300

    @action
    def quote(self, ctx: Context) -> int:
        LOG.append(f"quote {ctx.idempotency_key}")
        self.budget -= 300
        return 3

    @action
    def upgrade(self, ctx: Context) -> None:
        LOG.append(f"upgrade {ctx.idempotency_key}")
        raise OutOfStock("suite")

    @step(order=3)
    def car(self, ctx: Context) -> None:
        LOG.append(f"car {ctx.idempotency_key}")
        if self.fail_car:
            raise OutOfStock("car")
        self.booked += ("car",)
