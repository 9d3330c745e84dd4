"""Checked by `mypy --strict`, never run: the DSL keeps methods and constructors typed."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, assert_type

import attrs

from declsaga import Action, Context, Saga, Setup, action, compensates, step
from declsaga.inspection import SagaPlan, plan


class PlaceOrder(Saga):
    order_id: str
    amount: int
    reservation: str | None = None
    notes: list[str] = attrs.field(factory=list)
    totals: dict[str, int] = attrs.Factory(dict)

    @step(order=1)
    def reserve_stock(self, ctx: Context) -> str:
        self.reservation = f"r-{self.order_id}"
        return self.reservation

    @step(order=2, name="charge")
    async def charge_card(self, ctx: Context) -> int:
        return self.amount

    @compensates("reserve_stock")
    def release_stock(self, ctx: Context) -> None:
        self.reservation = None

    @compensates("charge", name="refund")
    async def refund_card(self, ctx: Context) -> None: ...

    @action
    def audit(self, ctx: Context) -> bool:
        return True

    @action(name="notify")
    async def send_notification(self, ctx: Context) -> None: ...


# Accessed on the class, decorated methods are still functions with their signatures.
reserve: Callable[[PlaceOrder, Context], str] = PlaceOrder.reserve_stock
charge: Callable[[PlaceOrder, Context], Coroutine[Any, Any, int]] = PlaceOrder.charge_card


async def check(ctx: Context) -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    assert_type(saga.order_id, str)
    assert_type(saga.reservation, str | None)
    assert_type(saga.notes, list[str])
    assert_type(saga.reserve_stock(ctx), str)
    assert_type(await saga.charge_card(ctx), int)
    assert_type(saga.release_stock(ctx), None)
    assert_type(await saga.refund_card(ctx), None)
    assert_type(saga.audit(ctx), bool)
    assert_type(await saga.send_notification(ctx), None)

    setup: Setup = saga
    assert_type(saga.sequence(), tuple[str, ...])
    assert_type(saga.compensator("reserve_stock"), str | None)
    assert_type(saga.action("audit"), Action | None)
    assert_type(setup.sequence(), Sequence[str])
    assert_type(plan(PlaceOrder), SagaPlan)
    assert len(attrs.fields(PlaceOrder)) == 5  # accepted: Saga declares __attrs_attrs__

    PlaceOrder("o-1", 30)  # type: ignore[call-arg]
    PlaceOrder(order_id="o-1")  # type: ignore[call-arg]
    PlaceOrder(order_id=1, amount=30)  # type: ignore[arg-type]


class Wrong(Saga):
    @step(order=1)  # type: ignore[type-var]
    def no_context(self) -> None: ...

    @step  # type: ignore[call-overload]
    def bare(self, ctx: Context) -> None: ...

    @compensates  # type: ignore[call-overload]
    def bare_compensator(self, ctx: Context) -> None: ...

    @action("x")  # type: ignore[call-overload, untyped-decorator]
    def positional_name(self, ctx: Context) -> None: ...
