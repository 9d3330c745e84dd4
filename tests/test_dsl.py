"""SPEC §3: the declarative DSL, compiled once per class into the `Setup` model."""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import re
import types
from typing import Any, ClassVar

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import declsaga
from declsaga import (
    Action,
    DefinitionError,
    Saga,
    Setup,
    UsageError,
    action,
    compensates,
    step,
    validate,
)
from declsaga import _dsl as dsl
from declsaga.inspection import ActionInfo, SagaPlan, plan

CTX: Any = object()  # these tests call actions directly; any object can stand for the Context


def run(saga: Saga, name: str) -> object:
    """Run action `name` of `saga` the way the executor does."""
    found = saga.action(name)
    assert found is not None, name
    return found.run(CTX)


def raises(message: str) -> Any:
    """pytest.raises for a DefinitionError with exactly `message`."""
    return pytest.raises(DefinitionError, match=f"^{re.escape(message)}$")


class PlaceOrder(Saga):
    order_id: str
    amount: int
    reservation: str | None = None
    log: list[str] = attrs.field(factory=list)

    @step(order=1)
    def reserve_stock(self, ctx: object) -> str:
        self.reservation = f"r-{self.order_id}"
        self.log.append("reserve_stock")
        return self.reservation

    @compensates("reserve_stock")
    def release_stock(self, ctx: object) -> None:
        self.reservation = None
        self.log.append("release_stock")

    @step(order=2)
    async def charge_card(self, ctx: object) -> int:
        self.log.append("charge_card")
        return self.amount

    @action
    async def audit(self, ctx: object) -> str:
        self.log.append("audit")
        return "audited"


# --- the compiled Setup ---


def test_instance_is_a_setup_that_validates() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    assert isinstance(saga, Setup)
    validate(saga)
    assert saga.sequence() == ("reserve_stock", "charge_card")
    assert saga.compensator("reserve_stock") == "release_stock"
    assert saga.compensator("charge_card") is None
    assert saga.compensator("nope") is None
    assert saga.action("nope") is None


def test_action_runs_the_bound_method() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    reserve = saga.action("reserve_stock")
    assert isinstance(reserve, Action)
    assert reserve.name == "reserve_stock"
    assert reserve.is_async is False
    assert reserve.run(CTX) == "r-o-1"
    assert saga.reservation == "r-o-1"
    release = saga.action("release_stock")
    assert release is not None
    assert release.run(CTX) is None
    assert reservation_of(saga) is None
    assert saga.log == ["reserve_stock", "release_stock"]


def reservation_of(saga: PlaceOrder) -> str | None:
    return saga.reservation  # read in a function: mypy keeps attribute narrowing across calls


def test_sync_and_async_methods_mix() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    charge, audit = saga.action("charge_card"), saga.action("audit")
    assert charge is not None and audit is not None
    assert (charge.is_async, audit.is_async) == (True, True)
    assert asyncio.run(charge.run(CTX)) == 30  # type: ignore[arg-type]
    assert asyncio.run(audit.run(CTX)) == "audited"  # type: ignore[arg-type]
    assert saga.log == ["charge_card", "audit"]


def test_actions_are_bound_on_each_call_never_cached() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    first, second = saga.action("reserve_stock"), saga.action("reserve_stock")
    assert first is not second
    assert first == second
    assert not hasattr(saga, "__dict__")


def test_steps_run_sorted_by_order_not_definition_order() -> None:
    class Ordered(Saga):
        @step(order=10)
        def last(self, ctx: object) -> None: ...

        @step(order=-5)
        def first(self, ctx: object) -> None: ...

        @step(order=0)
        def middle(self, ctx: object) -> None: ...

    assert Ordered().sequence() == ("first", "middle", "last")


@settings(database=None)  # a .hypothesis directory in the tree breaks collection
@given(st.lists(st.integers(), unique=True, max_size=8))
def test_sequence_is_the_steps_sorted_by_order(orders: list[int]) -> None:
    def body(namespace: dict[str, Any]) -> None:
        for index, order in enumerate(orders):
            namespace[f"s{index}"] = step(order=order)(lambda self, ctx: None)

    saga_class = types.new_class("Random", (Saga,), exec_body=body)
    expected = tuple(f"s{index}" for index, _ in sorted(enumerate(orders), key=lambda p: p[1]))
    assert saga_class().sequence() == expected


def test_name_overrides_the_action_name() -> None:
    class Named(Saga):
        @step(order=1, name="reserve")
        def reserve_stock(self, ctx: object) -> str:
            return "reserved"

        @compensates("reserve", name="release")
        def release_stock(self, ctx: object) -> str:
            return "released"

        @action(name="audit-log")
        def audit(self, ctx: object) -> str:
            return "audited"

    saga = Named()
    assert saga.sequence() == ("reserve",)
    assert saga.compensator("reserve") == "release"
    assert saga.action("reserve_stock") is None
    assert saga.action("audit") is None
    assert [run(saga, n) for n in ("reserve", "release", "audit-log")] == [
        "reserved",
        "released",
        "audited",
    ]


def test_a_compensator_may_undo_any_action_of_the_class() -> None:
    class Nested(Saga):
        @step(order=1)
        def start(self, ctx: object) -> None: ...

        @action
        def helper(self, ctx: object) -> None: ...

        @compensates("helper")
        def undo_helper(self, ctx: object) -> None: ...

    assert Nested().compensator("helper") == "undo_helper"


def test_a_saga_without_actions_is_an_empty_setup() -> None:
    class Empty(Saga):
        note: str = ""

    saga = Empty()
    assert saga.sequence() == ()
    validate(saga)


def test_decorators_return_the_function_itself() -> None:
    def fn(self: object, ctx: object) -> str:
        return "called"

    async def afn(self: object, ctx: object) -> None: ...

    assert step(order=1)(fn) is fn
    assert fn(None, CTX) == "called"
    assert compensates("x", name="y")(afn) is afn
    bare = lambda self, ctx: None  # noqa: E731 - a function made without def on purpose
    assert action(bare) is bare
    assert action(name="z")(lambda self, ctx: None).__name__ == "<lambda>"


def test_decorators_outside_a_saga_only_mark() -> None:
    class NotASaga:
        @step(order=1)
        def one(self, ctx: object) -> int:
            return 1

        @step(order=1)
        def same_order(self, ctx: object) -> int:
            return 1

        @compensates("unknown")
        def undo(self, ctx: object) -> None: ...

    assert NotASaga().one(CTX) == 1
    assert NotASaga().same_order(CTX) == 1


def test_a_lambda_counts_under_its_attribute_name() -> None:
    class WithLambda(Saga):
        go = step(order=1)(lambda self, ctx: "went")

    saga = WithLambda()
    assert saga.sequence() == ("go",)
    assert run(saga, "go") == "went"


def test_super_works_in_saga_methods() -> None:
    class Base(Saga):
        def describe(self) -> str:
            return "base"

    class Child(Base):
        @step(order=1)
        def go(self, ctx: object) -> str:
            return "child of " + super().describe()

    assert run(Child(), "go") == "child of base"


# --- fields ---


def test_fields_are_keyword_only_with_defaults() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    assert (saga.order_id, saga.amount, saga.reservation, saga.log) == ("o-1", 30, None, [])
    assert [field.name for field in attrs.fields(PlaceOrder)] == [
        "order_id",
        "amount",
        "reservation",
        "log",
    ]
    assert all(field.kw_only for field in attrs.fields(PlaceOrder))
    with pytest.raises(TypeError, match="positional"):
        PlaceOrder("o-1", 30)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="amount"):
        PlaceOrder(order_id="o-1")  # type: ignore[call-arg]
    assert repr(saga) == "PlaceOrder(order_id='o-1', amount=30, reservation=None, log=[])"


def test_fields_are_writable_and_slotted() -> None:
    saga = PlaceOrder(order_id="o-1", amount=30)
    saga.amount = 40
    assert saga.amount == 40
    assert not hasattr(saga, "__dict__")
    with pytest.raises(AttributeError):
        saga.undeclared = 1  # type: ignore[attr-defined]
    assert Saga.__slots__ == ()


def test_instances_compare_by_identity_and_are_hashable() -> None:
    one = PlaceOrder(order_id="o-1", amount=30)
    two = PlaceOrder(order_id="o-1", amount=30)
    assert one != two
    assert one == one  # noqa: PLR0124 - identity is the point
    assert len({one, two, one}) == 2
    assert hash(one) == object.__hash__(one)


def test_two_instances_do_not_share_state() -> None:
    one = PlaceOrder(order_id="o-1", amount=30)
    two = PlaceOrder(order_id="o-2", amount=5)
    run(one, "reserve_stock")
    assert (one.reservation, two.reservation) == ("r-o-1", None)
    assert (one.log, two.log) == (["reserve_stock"], [])
    assert one.log is not two.log


def test_a_copy_gets_actions_bound_to_the_copy() -> None:
    original = PlaceOrder(order_id="o-1", amount=30)
    run(original, "reserve_stock")
    duplicate = copy.copy(original)
    duplicate.log = []
    duplicate.order_id = "o-2"
    assert run(duplicate, "reserve_stock") == "r-o-2"
    assert (original.reservation, duplicate.reservation) == ("r-o-1", "r-o-2")
    assert original.log == ["reserve_stock"]
    deep = copy.deepcopy(original)
    bound = deep.action("release_stock")
    assert bound is not None
    assert bound.fn.__self__ is deep  # type: ignore[attr-defined]
    # mypy's attrs plugin does not see the metaclass-made attrs class; attrs does
    evolved = attrs.evolve(original, amount=1)  # type: ignore[misc]
    assert evolved.action("charge_card").fn.__self__ is evolved  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("default", "shown", "factory"),
    [
        ("[]", "[] (list)", "list"),
        ("{}", "{} (dict)", "dict"),
        ("set()", "set() (set)", "set"),
        ("attrs.field(default=[1])", "[1] (list)", "list"),
        ("collections.OrderedDict()", "OrderedDict() (OrderedDict)", "OrderedDict"),
        ("HashableList()", "[] (HashableList)", "HashableList"),
        ("bytearray()", "bytearray(b'') (bytearray)", "bytearray"),
    ],
)
def test_a_mutable_default_is_an_error(default: str, shown: str, factory: str) -> None:
    source = f"class Bad(Saga):\n    items: object = {default}\n"
    namespace = {"Saga": Saga, "attrs": attrs, "collections": collections}
    namespace["HashableList"] = HashableList
    with raises(
        f"Saga Bad: field items has a mutable default, {shown}, that all instances would "
        f"share; use attrs.field(factory=...) instead, e.g. attrs.field(factory={factory})."
    ):
        exec(source, namespace)


class HashableList(list[int]):
    def __hash__(self) -> int:  # type: ignore[override]
        return 0


def test_immutable_defaults_and_factories_are_fine() -> None:
    class Fine(Saga):
        tags: tuple[str, ...] = ()
        kinds: frozenset[str] = frozenset()
        items: list[int] = attrs.field(factory=list)
        table: dict[str, int] = attrs.Factory(dict)
        limit: int | None = None
        shared: ClassVar[list[int]] = []

    one, two = Fine(), Fine()
    one.items.append(1)
    one.table["a"] = 1
    assert (two.items, two.table) == ([], {})
    assert "shared" not in attrs.fields_dict(Fine)


def test_an_unannotated_attrs_field_is_an_error() -> None:
    with raises(
        "Saga test_an_unannotated_attrs_field_is_an_error.<locals>.Bad: attrs.field() without "
        "a type annotation in extra; fields are annotated class attributes, "
        "e.g. x: int = attrs.field(default=0)."
    ):

        class Bad(Saga):
            value: int = 0
            extra = attrs.field(default=1)


# --- inheritance ---


class Base(Saga):
    customer: str = "c"

    @step(order=1)
    def first(self, ctx: object) -> str:
        return "base first"

    @compensates("first")
    def undo_first(self, ctx: object) -> str:
        return "base undo"

    @step(order=2)
    def second(self, ctx: object) -> str:
        return "base second"

    @action
    def helper(self, ctx: object) -> str:
        return "base helper"


def test_subclasses_inherit_steps_compensators_and_fields() -> None:
    class Child(Base):
        amount: int = 0

        @step(order=3)
        def third(self, ctx: object) -> str:
            return "child third"

        @compensates("third")
        def undo_third(self, ctx: object) -> None: ...

    saga = Child(customer="x", amount=2)
    assert saga.sequence() == ("first", "second", "third")
    assert saga.compensator("first") == "undo_first"
    assert saga.compensator("third") == "undo_third"
    assert [field.name for field in attrs.fields(Child)] == ["customer", "amount"]
    assert run(saga, "first") == "base first"
    assert not hasattr(saga, "__dict__")
    # the base is untouched
    assert Base().sequence() == ("first", "second")
    assert Base().compensator("third") is None


def test_an_undecorated_override_removes_the_action() -> None:
    class Child(Base):
        def second(self, ctx: object) -> str:
            return "plain"

        def helper(self, ctx: object) -> str:
            return "plain"

    saga = Child()
    assert saga.sequence() == ("first",)
    assert saga.action("second") is None
    assert saga.action("helper") is None
    assert saga.second(CTX) == "plain"


def test_a_field_overrides_an_inherited_action_like_any_attribute() -> None:
    class Child(Base):
        helper: str  # type: ignore[assignment]
        second: int = 0  # type: ignore[assignment]

    saga = Child(helper="h")
    assert saga.sequence() == ("first",)
    assert saga.action("helper") is None


def test_overriding_a_step_with_another_order_moves_it() -> None:
    class Child(Base):
        @step(order=0)
        def second(self, ctx: object) -> str:
            return "child second"

    saga = Child()
    assert saga.sequence() == ("second", "first")
    assert run(saga, "second") == "child second"


def test_an_override_may_change_what_a_method_is() -> None:
    class Child(Base):
        @action
        def second(self, ctx: object) -> str:
            return "now an action"

        @step(order=2)
        def helper(self, ctx: object) -> str:
            return "now a step"

    saga = Child()
    assert saga.sequence() == ("first", "helper")
    assert [info.kind for info in plan(Child).actions] == ["step", "compensator", "action", "step"]


def test_redefining_the_compensator_method_replaces_it() -> None:
    class Child(Base):
        @compensates("first")
        def undo_first(self, ctx: object) -> str:
            return "child undo"

    saga = Child()
    assert saga.compensator("first") == "undo_first"
    assert run(saga, "undo_first") == "child undo"


def test_a_second_compensator_for_an_inherited_action_is_an_error() -> None:
    with raises(
        "Saga test_a_second_compensator_for_an_inherited_action_is_an_error.<locals>.Child: "
        "action 'first' has two compensators, methods undo_first (inherited from Base) and "
        "also_undo_first; keep one."
    ):

        class Child(Base):
            @compensates("first")
            def also_undo_first(self, ctx: object) -> None: ...


def test_a_step_order_taken_by_an_inherited_step_is_an_error() -> None:
    with raises(
        "Saga test_a_step_order_taken_by_an_inherited_step_is_an_error.<locals>.Child: steps "
        "first (inherited from Base) and another both have order 1; give each step its own "
        "order."
    ):

        class Child(Base):
            @step(order=1)
            def another(self, ctx: object) -> None: ...


def test_removing_a_compensated_action_orphans_its_compensator() -> None:
    with raises(
        "Saga test_removing_a_compensated_action_orphans_its_compensator.<locals>.Child: method "
        "undo_first (inherited from Base) compensates 'first', but the saga has no action named "
        "'first'; method first is not decorated as a step or action."
    ):

        class Child(Base):
            def first(self, ctx: object) -> str:
                return "plain"


def test_a_mixin_may_contribute_actions() -> None:
    class AuditMixin:
        @action
        def audit(self, ctx: object) -> str:
            return "audited"

    class Audited(AuditMixin, Base):
        @compensates("audit")
        def unaudit(self, ctx: object) -> None: ...

    saga = Audited()
    assert run(saga, "audit") == "audited"
    assert saga.compensator("audit") == "unaudit"
    assert plan(Audited).actions[-2].defined_in is AuditMixin


# --- compiled once ---


def test_a_class_is_compiled_once_and_never_again(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[type] = []
    body_runs: list[str] = []
    real_compile = dsl._compile

    def counting(cls: type[Saga], namespace: Any, saga_name: str) -> Any:
        compiled.append(cls)
        return real_compile(cls, namespace, saga_name)

    monkeypatch.setattr(dsl, "_compile", counting)

    class Once(Saga):
        body_runs.append("body")
        value: int = 0

        @step(order=1)
        def go(self, ctx: object) -> int:
            return self.value

    # attrs' slotted rebuild passes through the metaclass again but is not compiled
    assert compiled == [Once]
    assert body_runs == ["body"]

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("compiled again")

    monkeypatch.setattr(dsl, "_compile", refuse)
    monkeypatch.setattr(dsl, "_collect", refuse)
    monkeypatch.setattr(attrs, "define", refuse)
    saga = Once(value=3)
    for _ in range(3):
        assert saga.sequence() == ("go",)
        assert saga.compensator("go") is None
        assert run(saga, "go") == 3
    assert run(copy.copy(saga), "go") == 3
    assert body_runs == ["body"]


def test_the_plan_is_shared_by_instances() -> None:
    one, two = PlaceOrder(order_id="a", amount=1), PlaceOrder(order_id="b", amount=2)
    assert one.sequence() is two.sequence()
    assert dsl.compiled(PlaceOrder) is dsl.compiled(PlaceOrder)


def test_saga_itself_is_not_instantiable() -> None:
    with pytest.raises(
        UsageError,
        match=r"^Saga is the base class of declarative sagas: subclass it and instantiate "
        r"the subclass\.$",
    ):
        Saga()


def test_unknown_class_keywords_are_an_error() -> None:
    with raises(
        "Saga test_unknown_class_keywords_are_an_error.<locals>.Bad: unknown class keyword "
        "argument flavour='x'; accepted: deadline, name."
    ):

        class Bad(Saga, flavour="x"):
            pass


def test_definition_errors_are_also_type_and_value_errors() -> None:
    assert issubclass(DefinitionError, TypeError)
    assert issubclass(DefinitionError, declsaga.InvalidSetup)


# --- decorator misuse, reported with the class and method ---


def test_bare_step() -> None:
    with raises("Saga test_bare_step.<locals>.Bad: method go uses @step without an order; "
                "write @step(order=1).") as caught:  # fmt: skip

        class Bad(Saga):
            @step  # type: ignore[call-overload]
            def go(self, ctx: object) -> None: ...

    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize("call", ["step()", 'step(name="x")'])
def test_step_without_order(call: str) -> None:
    source = f"class Bad(Saga):\n    @{call}\n    def go(self, ctx): ...\n"
    with raises("Saga Bad: method go uses @step without an order; write @step(order=1)."):
        exec(source, {"Saga": Saga, "step": step})


@pytest.mark.parametrize(
    ("call", "fix"),
    [("step(2)", "@step(order=2)"), ('step("2", name="x")', '@step(order=1, name="x")')],
)
def test_step_with_a_positional_order(call: str, fix: str) -> None:
    source = f"class Bad(Saga):\n    @{call}\n    def go(self, ctx): ...\n"
    with raises(f"Saga Bad: method go uses @{call}; the order is keyword-only: write {fix}."):
        exec(source, {"Saga": Saga, "step": step})


@pytest.mark.parametrize(
    ("order", "shown"),
    [
        ('"1"', "'1' (str)"),
        ("True", "True (bool)"),
        ("1.0", "1.0 (float)"),
        ("None", "None (NoneType)"),
    ],
)
def test_step_order_must_be_an_int(order: str, shown: str) -> None:
    source = f"class Bad(Saga):\n    @step(order={order})\n    def go(self, ctx): ...\n"
    with raises(
        f"Saga Bad: the order of step go must be an int, got {shown}; write e.g. @step(order=1)."
    ):
        exec(source, {"Saga": Saga, "step": step})


def test_two_steps_with_the_same_order() -> None:
    with raises(
        "Saga test_two_steps_with_the_same_order.<locals>.Bad: steps one and two both have "
        "order 1; give each step its own order."
    ):

        class Bad(Saga):
            @step(order=1)
            def one(self, ctx: object) -> None: ...

            @step(order=1)
            def two(self, ctx: object) -> None: ...


def test_bare_compensates() -> None:
    with raises(
        "Saga test_bare_compensates.<locals>.Bad: method undo uses @compensates without the "
        'action it undoes; write @compensates("action_name").'
    ):

        class Bad(Saga):
            @compensates  # type: ignore[call-overload]
            def undo(self, ctx: object) -> None: ...


def test_compensates_given_a_function() -> None:
    with raises(
        "Saga test_compensates_given_a_function.<locals>.Bad: method release_stock uses "
        "@compensates(reserve_stock), a function; name the action as a string: write "
        '@compensates("reserve_stock").'
    ):

        class Bad(Saga):
            @step(order=1)
            def reserve_stock(self, ctx: object) -> None: ...

            @compensates(reserve_stock)  # type: ignore[call-overload, untyped-decorator]
            def release_stock(self, ctx: object) -> None: ...


def test_compensates_given_a_renamed_step_function_shows_its_action_name() -> None:
    with raises(
        "Saga test_compensates_given_a_renamed_step_function_shows_its_action_name.<locals>.Bad: "
        "method release_stock uses @compensates(reserve), a function; name the action as a "
        'string: write @compensates("reserve").'
    ):

        class Bad(Saga):
            @step(order=1, name="reserve")
            def reserve_stock(self, ctx: object) -> None: ...

            @compensates(reserve_stock)  # type: ignore[call-overload, untyped-decorator]
            def release_stock(self, ctx: object) -> None: ...


@pytest.mark.parametrize(
    ("target", "shown"), [("1", "1 (int)"), ('""', "'' (str)"), ('" "', "' ' (str)")]
)
def test_compensates_needs_a_non_empty_name(target: str, shown: str) -> None:
    source = f"class Bad(Saga):\n    @compensates({target})\n    def undo(self, ctx): ...\n"
    with raises(
        "Saga Bad: the action that method undo compensates must be named by a non-empty "
        f"string, got {shown}."
    ):
        exec(source, {"Saga": Saga, "compensates": compensates})


def test_compensates_without_arguments() -> None:
    source = "class Bad(Saga):\n    @compensates()\n    def undo(self, ctx): ...\n"
    with raises(
        "Saga Bad: method undo uses @compensates without the action it undoes; write "
        '@compensates("action_name").'
    ):
        exec(source, {"Saga": Saga, "compensates": compensates})


def test_compensates_an_unknown_action() -> None:
    with raises(
        "Saga test_compensates_an_unknown_action.<locals>.Bad: method undo compensates "
        "'reserve', but the saga has no action named 'reserve'."
    ):

        class Bad(Saga):
            @compensates("reserve")
            def undo(self, ctx: object) -> None: ...


def test_compensates_a_method_name_instead_of_its_action_name() -> None:
    with raises(
        "Saga test_compensates_a_method_name_instead_of_its_action_name.<locals>.Bad: method undo "
        "compensates 'reserve_stock', but the saga has no action named 'reserve_stock'; method "
        "reserve_stock has the action name 'reserve': write @compensates(\"reserve\")."
    ):

        class Bad(Saga):
            @step(order=1, name="reserve")
            def reserve_stock(self, ctx: object) -> None: ...

            @compensates("reserve_stock")
            def undo(self, ctx: object) -> None: ...


def test_two_compensators_for_one_action() -> None:
    with raises(
        "Saga test_two_compensators_for_one_action.<locals>.Bad: action 'go' has two "
        "compensators, methods undo and undo_again; keep one."
    ):

        class Bad(Saga):
            @step(order=1)
            def go(self, ctx: object) -> None: ...

            @compensates("go")
            def undo(self, ctx: object) -> None: ...

            @compensates("go")
            def undo_again(self, ctx: object) -> None: ...


@pytest.mark.parametrize(
    ("call", "fix"), [('action("x")', '@action(name="x")'), ("action(1)", '@action(name="...")')]
)
def test_action_with_a_positional_name(call: str, fix: str) -> None:
    source = f"class Bad(Saga):\n    @{call}\n    def audit(self, ctx): ...\n"
    with raises(f"Saga Bad: method audit uses @{call}; the name is keyword-only: write {fix}."):
        exec(source, {"Saga": Saga, "action": action})


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        ('step(order=1, name="")', "'' (str)"),
        ('compensates("go", name="  ")', "'  ' (str)"),
        ("action(name=3)", "3 (int)"),
    ],
)
def test_action_names_must_be_non_empty_strings(call: str, shown: str) -> None:
    source = f"class Bad(Saga):\n    @{call}\n    def m(self, ctx): ...\n"
    with raises(f"Saga Bad: the action name of method m must be a non-empty string, got {shown}."):
        exec(source, {"Saga": Saga, "step": step, "compensates": compensates, "action": action})


@pytest.mark.parametrize(
    ("outer", "inner", "spelled"),
    [
        ("step(order=1)", "action", "@step(order=1) and @action"),
        ("step(order=1)", "step(order=2)", "@step(order=1) and @step(order=2)"),
        ('action(name="a")', 'compensates("go", name="b")',
         '@action(name="a") and @compensates("go", name="b")'),
    ],
)  # fmt: skip
def test_one_method_decorated_as_two_things(outer: str, inner: str, spelled: str) -> None:
    source = f"class Bad(Saga):\n    @{outer}\n    @{inner}\n    def m(self, ctx): ...\n"
    with raises(
        f"Saga Bad: method m is decorated twice, with {spelled}; a method is one step, "
        "compensator or action."
    ):
        exec(source, {"Saga": Saga, "step": step, "compensates": compensates, "action": action})


def test_two_methods_with_the_same_action_name() -> None:
    with raises(
        "Saga test_two_methods_with_the_same_action_name.<locals>.Bad: methods go and audit both "
        "have the action name 'go'; give one of them another name=."
    ):

        class Bad(Saga):
            @step(order=1)
            def go(self, ctx: object) -> None: ...

            @action(name="go")
            def audit(self, ctx: object) -> None: ...


def test_an_action_name_taken_by_an_inherited_method() -> None:
    with raises(
        "Saga test_an_action_name_taken_by_an_inherited_method.<locals>.Bad: methods helper "
        "(inherited from Base) and other both have the action name 'helper'; give one of them "
        "another name=."
    ):

        class Bad(Base):
            @action(name="helper")
            def other(self, ctx: object) -> None: ...


@pytest.mark.parametrize(
    "wrapper", ["staticmethod", "classmethod", "property", "functools.cached_property"]
)
@pytest.mark.parametrize("decorator_outside", [True, False])
def test_decorated_wrappers_are_an_error(wrapper: str, decorator_outside: bool) -> None:
    lines = ["@step(order=1)", f"@{wrapper}"]
    if not decorator_outside:
        lines.reverse()
    source = f"class Bad(Saga):\n    {lines[0]}\n    {lines[1]}\n    def m(x): ...\n"
    with raises(
        f"Saga Bad: @step(order=1) decorates m, a {wrapper.rpartition('.')[2]}; saga actions "
        "are plain methods (def or async def)."
    ):
        exec(source, {"Saga": Saga, "step": step, "functools": functools})


def test_decorating_something_that_is_not_a_function() -> None:
    with raises(
        "@step(order=1) can only decorate a function defined with def or async def, got 42 (int)."
    ):
        step(order=1)(42)  # type: ignore[type-var]


def test_argument_errors_outside_a_class_name_the_function() -> None:
    with raises("The order of step go must be an int, got 'x' (str); write e.g. @step(order=1)."):

        @step(order="x")  # type: ignore[call-overload, untyped-decorator]
        def go(self: object, ctx: object) -> None: ...


@pytest.mark.parametrize("setup_method", ["sequence", "compensator", "action"])
def test_an_action_name_shadowing_a_setup_method(setup_method: str) -> None:
    source = f'class Bad(Saga):\n    @action(name="{setup_method}")\n    def m(self, ctx): ...\n'
    with raises(
        f"Saga Bad: method m has the action name '{setup_method}', which shadows the Setup "
        f"method {setup_method}(); choose another name=."
    ):
        exec(source, {"Saga": Saga, "action": action})


@pytest.mark.parametrize(
    ("definition", "kind", "name"),
    [
        ("@step(order=1)\n    def sequence(self, ctx): ...", "method", "sequence"),
        ("def compensator(self, name): ...", "method", "compensator"),
        ("action = 1", "attribute", "action"),
    ],
)
def test_a_method_shadowing_a_setup_method(definition: str, kind: str, name: str) -> None:
    source = f"class Bad(Saga):\n    {definition}\n"
    with raises(
        f"Saga Bad: {kind} {name} shadows the Setup method {name}() that the executor calls; "
        "rename it."
    ):
        exec(source, {"Saga": Saga, "step": step})


@pytest.mark.parametrize("field", ["sequence: int = 0", "action: str", "compensator: str = ''"])
def test_a_field_shadowing_a_setup_method(field: str) -> None:
    name = field.partition(":")[0]
    with raises(
        f"Saga Bad: field {name} shadows the Setup method {name}() that the executor calls; "
        "rename the field."
    ):
        exec(f"class Bad(Saga):\n    {field}\n", {"Saga": Saga})


def test_a_setup_method_shadowed_by_a_mixin() -> None:
    class Mixin:
        def sequence(self) -> tuple[str, ...]:
            return ()

    with raises(
        "Saga test_a_setup_method_shadowed_by_a_mixin.<locals>.Bad: method sequence (inherited "
        "from test_a_setup_method_shadowed_by_a_mixin.<locals>.Mixin) shadows the Setup method "
        "sequence() that the executor calls; rename it."
    ):

        class Bad(Mixin, Saga):
            pass


# --- introspection ---


def test_plan_describes_the_compiled_class() -> None:
    compiled = plan(PlaceOrder)
    assert isinstance(compiled, SagaPlan)
    assert compiled is plan(PlaceOrder)
    assert compiled.saga is PlaceOrder
    assert compiled.sequence == ("reserve_stock", "charge_card")
    assert dict(compiled.compensators) == {"reserve_stock": "release_stock"}
    assert [step.name for step in compiled.steps] == ["reserve_stock", "charge_card"]
    assert compiled.actions == (
        ActionInfo(
            name="reserve_stock",
            method="reserve_stock",
            kind="step",
            is_async=False,
            order=1,
            compensates=None,
            defined_in=PlaceOrder,
            function=PlaceOrder.reserve_stock,
        ),
        ActionInfo(
            name="release_stock",
            method="release_stock",
            kind="compensator",
            is_async=False,
            order=None,
            compensates="reserve_stock",
            defined_in=PlaceOrder,
            function=PlaceOrder.release_stock,
        ),
        ActionInfo(
            name="charge_card",
            method="charge_card",
            kind="step",
            is_async=True,
            order=2,
            compensates=None,
            defined_in=PlaceOrder,
            function=PlaceOrder.charge_card,
        ),
        ActionInfo(
            name="audit",
            method="audit",
            kind="action",
            is_async=True,
            order=None,
            compensates=None,
            defined_in=PlaceOrder,
            function=PlaceOrder.audit,
        ),
    )
    with pytest.raises(TypeError):
        compiled.compensators["charge_card"] = "x"  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        compiled.sequence = ()  # type: ignore[misc]
    assert hash(compiled) == hash(plan(PlaceOrder))


def test_plan_of_a_subclass_shows_where_methods_come_from() -> None:
    class Child(Base):
        @step(order=0, name="zeroth")
        def early(self, ctx: object) -> None: ...

        def helper(self, ctx: object) -> str:
            return "plain"

    compiled = plan(Child)
    assert [(a.name, a.method, a.defined_in) for a in compiled.actions] == [
        ("first", "first", Base),
        ("undo_first", "undo_first", Base),
        ("second", "second", Base),
        ("zeroth", "early", Child),
    ]
    assert [(s.name, s.order) for s in compiled.steps] == [("zeroth", 0), ("first", 1),
                                                            ("second", 2)]  # fmt: skip
    assert compiled.sequence == Child().sequence()


def test_plan_of_something_else_is_a_usage_error() -> None:
    class Plain:
        pass

    cases: list[tuple[object, str]] = [
        (
            PlaceOrder(order_id="o", amount=1),
            "plan() takes a Saga subclass, not an instance: write plan(PlaceOrder), "
            "or plan(type(saga)).",
        ),
        (Saga, "plan() takes a subclass of Saga, not Saga itself."),
        (
            Plain,
            "plan() takes a Saga subclass, got the class "
            "test_plan_of_something_else_is_a_usage_error.<locals>.Plain, which is not one.",
        ),
        (3, "plan() takes a Saga subclass, got 3 (int)."),
    ]
    for value, message in cases:
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            plan(value)  # type: ignore[arg-type]
