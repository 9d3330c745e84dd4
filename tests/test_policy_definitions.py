"""Step policies attached to definitions: `retry=` and `timeout=` on `@step` and
`@compensates`, the `deadline=` class keyword, and `new(retries=, timeouts=, deadline=)`.

The executor reads them with `getattr(setup, "_declsaga_policy")(name)`,
`getattr(setup, "_declsaga_policies")()` (all of them: empty means none) and
`getattr(setup, "_declsaga_deadline")()`; these tests check what definitions record.
"""

from __future__ import annotations

import math
import re
import types
from typing import Any

import pytest

import declsaga
from declsaga import DefinitionError, Saga, UsageError, action, compensates, step
from declsaga import _dsl as dsl
from declsaga._policies import Retry
from declsaga._registry import lookup
from declsaga.inspection import ActionPolicy, plan


def retry(**kwargs: Any) -> Retry:
    """A Retry built from untyped values: policies are checked where they are attached."""
    return Retry(**kwargs)


def raises(message: str) -> Any:
    """pytest.raises for a DefinitionError with exactly `message`."""
    return pytest.raises(DefinitionError, match=f"^{re.escape(message)}$")


def usage_error(message: str) -> Any:
    """pytest.raises for a UsageError with exactly `message`."""
    return pytest.raises(UsageError, match=f"^{re.escape(message)}$")


def noop(ctx: declsaga.Context) -> None:
    return None


# (the retry, what the message says about it)
BAD_RETRIES: list[tuple[object, str]] = [
    (retry(attempts=0), "needs attempts of at least 1, got attempts=0"),
    (retry(attempts=-2), "needs attempts of at least 1, got attempts=-2"),
    (retry(attempts=2.0), "needs attempts of at least 1, got attempts=2.0"),
    (retry(attempts=True), "needs attempts of at least 1, got attempts=True"),
    (retry(backoff=-0.5), "needs a backoff of 0 seconds or more, finite, got backoff=-0.5"),
    (retry(backoff=math.inf), "needs a backoff of 0 seconds or more, finite, got backoff=inf"),
    (retry(max_delay=0), "needs a max_delay above 0 seconds, finite, got max_delay=0"),
    (retry(max_delay=-1.0), "needs a max_delay above 0 seconds, finite, got max_delay=-1.0"),
    (retry(multiplier=0.5), "needs a multiplier of at least 1, got multiplier=0.5"),
    (retry(multiplier=0), "needs a multiplier of at least 1, got multiplier=0"),
    (retry(jitter=1.5), "needs a jitter from 0 to 1, got jitter=1.5"),
    (retry(jitter=-0.1), "needs a jitter from 0 to 1, got jitter=-0.1"),
    (retry(on=(ValueError, 3)), "needs on= to hold exception types only, got 3"),
    (retry(on=(ValueError, int)), "needs on= to hold exception types only, got <class 'int'>"),
    (
        retry(on=ValueError),
        "needs on= as a non-empty tuple of exception types, got on=<class 'ValueError'>",
    ),
    (retry(on=()), "needs on= as a non-empty tuple of exception types, got on=()"),
    (
        retry(on=[ValueError]),
        "needs on= as a non-empty tuple of exception types, got on=[<class 'ValueError'>]",
    ),
    (3, "must be a Retry, got 3"),
    ({"attempts": 3}, "must be a Retry, got {'attempts': 3}"),
]

# (the timeout, how the message shows it)
BAD_SECONDS: list[tuple[object, str]] = [
    (0, "0"),
    (0.0, "0.0"),
    (-1, "-1"),
    (-0.5, "-0.5"),
    (math.nan, "nan"),
    (math.inf, "inf"),
    (True, "True"),
    ("5", "'5'"),
]

STEP_SOURCE = (
    "class PlaceOrder(Saga):\n    @step(order=1, {option}=VALUE)\n    def charge(self, ctx): ...\n"
)
COMPENSATOR_SOURCE = (
    "class PlaceOrder(Saga):\n"
    "    @step(order=1)\n"
    "    def charge(self, ctx): ...\n"
    '    @compensates("charge", {option}=VALUE)\n'
    "    def refund(self, ctx): ...\n"
)


def define(source: str, value: object) -> None:
    namespace = {"Saga": Saga, "step": step, "compensates": compensates, "VALUE": value}
    exec(source, namespace)


# --- mistakes in the DSL, reported while the class body runs ---


@pytest.mark.parametrize(("value", "problem"), BAD_RETRIES)
def test_a_bad_step_retry(value: object, problem: str) -> None:
    with raises(f"Saga PlaceOrder: the retry of step charge {problem}."):
        define(STEP_SOURCE.format(option="retry"), value)


@pytest.mark.parametrize(("value", "problem"), BAD_RETRIES)
def test_a_bad_compensator_retry(value: object, problem: str) -> None:
    with raises(f"Saga PlaceOrder: the retry of compensator refund {problem}."):
        define(COMPENSATOR_SOURCE.format(option="retry"), value)


@pytest.mark.parametrize(("value", "shown"), BAD_SECONDS)
def test_a_bad_step_timeout(value: object, shown: str) -> None:
    with raises(
        "Saga PlaceOrder: the timeout of step charge must be a number of seconds above 0, "
        f"got {shown}."
    ):
        define(STEP_SOURCE.format(option="timeout"), value)


@pytest.mark.parametrize(("value", "shown"), BAD_SECONDS)
def test_a_bad_compensator_timeout(value: object, shown: str) -> None:
    with raises(
        "Saga PlaceOrder: the timeout of compensator refund must be a number of seconds "
        f"above 0, got {shown}."
    ):
        define(COMPENSATOR_SOURCE.format(option="timeout"), value)


def test_the_retry_is_checked_before_the_timeout() -> None:
    source = (
        "class PlaceOrder(Saga):\n"
        "    @step(order=1, retry=VALUE, timeout=-1)\n"
        "    def charge(self, ctx): ...\n"
    )
    with raises(
        "Saga PlaceOrder: the retry of step charge needs attempts of at least 1, got attempts=0."
    ):
        define(source, retry(attempts=0))


def test_policies_are_checked_in_the_decorator_before_the_class_exists() -> None:
    body_ran_on: list[str] = []
    with raises(
        "Saga test_policies_are_checked_in_the_decorator_before_the_class_exists.<locals>."
        "PlaceOrder: the timeout of step charge must be a number of seconds above 0, got 0."
    ):

        class PlaceOrder(Saga):
            @step(order=1, timeout=0)
            def charge(self, ctx: object) -> None: ...

            body_ran_on.append("after charge")  # not reached: the decorator raised

    assert body_ran_on == []


def test_a_bad_policy_outside_a_class_names_the_function() -> None:
    def charge(self: object, ctx: object) -> None: ...

    with raises("The timeout of step charge must be a number of seconds above 0, got -1."):
        step(order=1, timeout=-1)(charge)
    with raises("The retry of compensator charge must be a Retry, got 'x'."):
        compensates("other", retry="x")(charge)  # type: ignore[call-overload]


def test_order_mistakes_still_come_first_and_spell_the_policies() -> None:
    source = "class PlaceOrder(Saga):\n    @step(2, timeout=1.5)\n    def charge(self, ctx): ...\n"
    with raises(
        "Saga PlaceOrder: method charge uses @step(2, timeout=1.5); the order is keyword-only: "
        "write @step(order=2, timeout=1.5)."
    ):
        define(source, None)


def test_a_method_decorated_twice_shows_its_policies() -> None:
    source = (
        "class PlaceOrder(Saga):\n"
        "    @step(order=1, timeout=2)\n"
        '    @compensates("x", name="y", retry=VALUE, timeout=0.5)\n'
        "    def charge(self, ctx): ...\n"
    )
    with raises(
        "Saga PlaceOrder: method charge is decorated twice, with @step(order=1, timeout=2) and "
        '@compensates("x", name="y", retry=Retry(attempts=2, backoff=0.1, multiplier=2.0, '
        "max_delay=30.0, jitter=0.1, on=(<class 'Exception'>,)), timeout=0.5); a method is "
        "one step, compensator or action."
    ):
        define(source, Retry(attempts=2))


@pytest.mark.parametrize(("value", "shown"), [*BAD_SECONDS, ([30], "[30]")])
def test_a_bad_deadline(value: object, shown: str) -> None:
    with raises(
        "Saga PlaceOrder: the deadline= class keyword must be a number of seconds above 0, "
        f"got {shown}."
    ):
        exec("class PlaceOrder(Saga, deadline=VALUE):\n    pass\n", {"Saga": Saga, "VALUE": value})


def test_unknown_class_keywords_list_deadline() -> None:
    with raises(
        "Saga test_unknown_class_keywords_list_deadline.<locals>.Bad: unknown class keyword "
        "argument timeout=3; accepted: deadline, name."
    ):

        class Bad(Saga, timeout=3):
            pass


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        (
            "def _declsaga_policy(self, name): ...",
            "method _declsaga_policy shadows the Setup method _declsaga_policy() that the "
            "executor calls; rename it",
        ),
        (
            "_declsaga_policies: int = 0",
            "field _declsaga_policies shadows the Setup method _declsaga_policies() that the "
            "executor calls; rename the field",
        ),
        (
            "_declsaga_deadline = 3",
            "attribute _declsaga_deadline shadows the Setup method _declsaga_deadline() that "
            "the executor calls; rename it",
        ),
        (
            "_declsaga_deadline: float = 3.0",
            "field _declsaga_deadline shadows the Setup method _declsaga_deadline() that the "
            "executor calls; rename the field",
        ),
    ],
)
def test_the_policy_methods_are_reserved(definition: str, message: str) -> None:
    with raises(f"Saga Bad: {message}."):
        exec(f"class Bad(Saga):\n    {definition}\n", {"Saga": Saga})


def test_fields_named_policy_and_deadline_are_the_users() -> None:
    class Insurance(Saga, deadline=5):
        policy: str = "p-1"
        deadline: float = 30.0

        @step(order=1, timeout=1)
        def sign(self, ctx: object) -> None: ...

    saga = Insurance()
    assert (saga.policy, saga.deadline) == ("p-1", 30.0)
    assert saga._declsaga_policy("sign") == ActionPolicy(timeout=1)
    assert saga._declsaga_deadline() == 5


# --- what a valid definition records ---

CHARGE_RETRY = Retry(attempts=4, backoff=0.5, on=(TimeoutError, ConnectionError))
REFUND_RETRY = Retry(attempts=10, max_delay=5.0)


class PlaceOrder(Saga, deadline=30.0):
    order_id: str = "o-1"

    @step(order=1)
    def reserve(self, ctx: object) -> None: ...

    @step(order=2, name="charge", retry=CHARGE_RETRY, timeout=2.5)
    def charge_card(self, ctx: object) -> None: ...

    @compensates("charge", name="refund", retry=REFUND_RETRY)
    def refund_card(self, ctx: object) -> None: ...

    @compensates("reserve", timeout=1)
    def release(self, ctx: object) -> None: ...

    @action
    def audit(self, ctx: object) -> None: ...


def test_a_saga_instance_reads_its_policies() -> None:
    saga = PlaceOrder()
    assert saga._declsaga_policy("charge") == ActionPolicy(retry=CHARGE_RETRY, timeout=2.5)
    assert saga._declsaga_policy("charge") is saga._declsaga_policy("charge")  # no copies
    assert saga._declsaga_policy("refund") == ActionPolicy(retry=REFUND_RETRY, timeout=None)
    assert saga._declsaga_policy("release") == ActionPolicy(retry=None, timeout=1)
    assert saga._declsaga_policy("reserve") is None
    assert saga._declsaga_policy("audit") is None
    assert saga._declsaga_policy("charge_card") is None  # the method name is not the action's
    assert saga._declsaga_policy("nope") is None
    assert saga._declsaga_deadline() == 30.0
    assert dict(saga._declsaga_policies()) == {
        "charge": ActionPolicy(retry=CHARGE_RETRY, timeout=2.5),
        "refund": ActionPolicy(retry=REFUND_RETRY),
        "release": ActionPolicy(timeout=1),
    }
    with pytest.raises(TypeError):
        saga._declsaga_policies()["audit"] = ActionPolicy(timeout=1)  # type: ignore[index]


def test_the_executor_finds_the_methods_with_getattr() -> None:
    saga = PlaceOrder()
    policy_of = getattr(saga, "_declsaga_policy", None)
    deadline_of = getattr(saga, "_declsaga_deadline", None)
    assert policy_of is not None and deadline_of is not None
    assert policy_of("charge").timeout == 2.5
    assert deadline_of() == 30.0


def test_no_policies_and_no_deadline_by_default() -> None:
    class Plain(Saga):
        @step(order=1, retry=None, timeout=None)
        def go(self, ctx: object) -> None: ...

        @compensates("go")
        def undo(self, ctx: object) -> None: ...

    saga = Plain()
    assert saga._declsaga_policy("go") is None
    assert saga._declsaga_policy("undo") is None
    assert saga._declsaga_deadline() is None
    assert not saga._declsaga_policies()
    assert dict(plan(Plain).policies) == {}
    assert plan(Plain).deadline is None


def test_decorators_with_policies_return_the_function_itself() -> None:
    def fn(self: object, ctx: object) -> str:
        return "called"

    async def afn(self: object, ctx: object) -> None: ...

    assert step(order=1, retry=Retry(), timeout=1)(fn) is fn
    assert compensates("x", name="y", retry=Retry(), timeout=1)(afn) is afn
    assert fn(None, None) == "called"


def test_the_plan_shows_the_policies() -> None:
    compiled = plan(PlaceOrder)
    assert compiled.deadline == 30.0
    assert dict(compiled.policies) == {
        "charge": ActionPolicy(retry=CHARGE_RETRY, timeout=2.5),
        "refund": ActionPolicy(retry=REFUND_RETRY),
        "release": ActionPolicy(timeout=1),
    }
    assert [(info.name, info.policy) for info in compiled.actions] == [
        ("reserve", None),
        ("charge", ActionPolicy(retry=CHARGE_RETRY, timeout=2.5)),
        ("refund", ActionPolicy(retry=REFUND_RETRY)),
        ("release", ActionPolicy(timeout=1)),
        ("audit", None),
    ]
    with pytest.raises(TypeError):
        compiled.policies["audit"] = ActionPolicy(timeout=1)  # type: ignore[index]
    assert "deadline=30.0" in repr(compiled)


# --- inheritance ---


def test_subclasses_inherit_the_deadline_and_the_policies() -> None:
    class Child(PlaceOrder):
        @step(order=3, timeout=4)
        def ship(self, ctx: object) -> None: ...

    class Grandchild(Child):
        pass

    for saga in (Child(), Grandchild()):
        assert saga._declsaga_deadline() == 30.0
        assert saga._declsaga_policy("charge") == ActionPolicy(retry=CHARGE_RETRY, timeout=2.5)
        assert saga._declsaga_policy("ship") == ActionPolicy(timeout=4)
    assert plan(Grandchild).deadline == 30.0
    assert PlaceOrder()._declsaga_policy("ship") is None  # the base is untouched


def test_a_subclass_may_set_or_remove_the_deadline() -> None:
    class Longer(PlaceOrder, deadline=60):
        pass

    class Without(PlaceOrder, deadline=None):
        pass

    class AfterWithout(Without):
        pass

    assert Longer()._declsaga_deadline() == 60
    assert Without()._declsaga_deadline() is None
    assert AfterWithout()._declsaga_deadline() is None
    assert PlaceOrder()._declsaga_deadline() == 30.0


def test_a_deadline_comes_from_the_nearest_saga_base() -> None:
    class Mixin:
        deadline_note = "not a saga"

    class Other(Saga, deadline=7):
        pass

    class Both(Mixin, PlaceOrder, Other):
        pass

    assert [c.__name__ for c in Both.__mro__[1:4]] == ["Mixin", "PlaceOrder", "Other"]
    assert Both()._declsaga_deadline() == 30.0


def test_overriding_a_method_replaces_its_policy() -> None:
    class Child(PlaceOrder):
        @step(order=2, name="charge", timeout=9)
        def charge_card(self, ctx: object) -> None: ...

        @compensates("charge", name="refund")
        def refund_card(self, ctx: object) -> None: ...

    saga = Child()
    assert saga._declsaga_policy("charge") == ActionPolicy(timeout=9)
    assert saga._declsaga_policy("refund") is None


# --- new() ---


def test_new_records_retries_timeouts_and_the_deadline() -> None:
    fast = Retry(attempts=2, backoff=0)
    setup = declsaga.new(
        {"reserve": noop, "charge": noop, "refund": noop, "audit": noop},
        sequence=["reserve", "charge"],
        compensators={"charge": "refund"},
        retries={"charge": fast, "refund": REFUND_RETRY},
        timeouts={"charge": 2, "audit": 0.25},
        deadline=45,
    )
    assert setup._declsaga_policy("charge") == ActionPolicy(retry=fast, timeout=2)  # type: ignore[attr-defined]
    assert setup._declsaga_policy("refund") == ActionPolicy(retry=REFUND_RETRY)  # type: ignore[attr-defined]
    assert setup._declsaga_policy("audit") == ActionPolicy(timeout=0.25)  # type: ignore[attr-defined]
    assert setup._declsaga_policy("reserve") is None  # type: ignore[attr-defined]
    assert setup._declsaga_policy("nope") is None  # type: ignore[attr-defined]
    assert setup._declsaga_deadline() == 45  # type: ignore[attr-defined]
    policies = setup._declsaga_policies()  # type: ignore[attr-defined]
    assert dict(policies) == {
        "charge": ActionPolicy(retry=fast, timeout=2),
        "refund": ActionPolicy(retry=REFUND_RETRY),
        "audit": ActionPolicy(timeout=0.25),
    }
    with pytest.raises(TypeError):
        policies["reserve"] = ActionPolicy(timeout=1)
    assert repr(setup).endswith(
        "policies={'charge': ActionPolicy(retry=Retry(attempts=2, backoff=0, multiplier=2.0, "
        "max_delay=30.0, jitter=0.1, on=(<class 'Exception'>,)), timeout=2), "
        "'refund': ActionPolicy(retry=Retry(attempts=10, backoff=0.1, multiplier=2.0, "
        "max_delay=5.0, jitter=0.1, on=(<class 'Exception'>,)), timeout=None), "
        "'audit': ActionPolicy(retry=None, timeout=0.25)} deadline=45>"
    )


def test_new_without_policies() -> None:
    setup = declsaga.new({"foo": noop}, retries={}, timeouts=None)
    assert getattr(setup, "_declsaga_policy")("foo") is None  # noqa: B009 - as the executor does
    assert getattr(setup, "_declsaga_deadline")() is None  # noqa: B009
    assert not getattr(setup, "_declsaga_policies")()  # noqa: B009
    assert repr(setup) == "<setup sequence=['foo'] actions=['foo'] compensators={}>"


def test_new_policies_may_name_actions_outside_the_sequence() -> None:
    setup = declsaga.new(
        [declsaga.Action("a", noop), declsaga.Action("b", noop)], timeouts={"b": 1}
    )
    assert list(setup.sequence()) == ["a"]
    assert setup._declsaga_policy("b") == ActionPolicy(timeout=1)  # type: ignore[attr-defined]


BAD_NEW: list[tuple[dict[str, Any], str]] = [
    *[({"retries": {"charge": value}}, f"new() got a retry for 'charge' that {problem}.")
      for value, problem in BAD_RETRIES],
    *[({"timeouts": {"charge": value}},
       f"new() got a timeout for 'charge' that must be a number of seconds above 0, got {shown}.")
      for value, shown in BAD_SECONDS],
    *[({"deadline": value},
       f"new() got a deadline that must be a number of seconds above 0, got {shown}.")
      for value, shown in BAD_SECONDS],
    ({"retries": {"nope": Retry()}},
     "new() got a retry for 'nope', which is not one of its actions."),
    ({"timeouts": {"nope": 1}}, "new() got a timeout for 'nope', which is not one of its actions."),
    ({"timeouts": {"charge": 1, "Charge": 1}},
     "new() got a timeout for 'Charge', which is not one of its actions."),
    ({"retries": {1: Retry()}}, "new() got a retry for 1, which is not one of its actions."),
    ({"retries": {"charge": None}},
     "new() got a retry for 'charge' that must be a Retry, got None."),
    ({"retries": ["charge"]},
     "retries must be a mapping of action name to Retry, got ['charge'] (list)."),
    ({"timeouts": 5}, "timeouts must be a mapping of action name to seconds, got 5 (int)."),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), BAD_NEW)
def test_new_rejects_bad_policies(kwargs: dict[str, Any], message: str) -> None:
    with usage_error(message) as caught:
        declsaga.new({"charge": noop, "refund": noop}, **kwargs)
    assert isinstance(caught.value, TypeError)


def test_new_checks_policies_before_registering_the_name() -> None:
    name = "tests.test_policy_definitions.unregistered"
    with usage_error(
        "new() got a timeout for 'foo' that must be a number of seconds above 0, got 0."
    ):
        declsaga.new({"foo": noop}, timeouts={"foo": 0}, name=name)
    assert lookup(name) is None


# --- policies are not part of the fingerprint (SPEC 8) ---


def test_policies_do_not_change_a_saga_class_fingerprint() -> None:
    def shape(policies: dict[str, Any], **keywords: object) -> type[Saga]:
        def body(namespace: dict[str, Any]) -> None:
            namespace["go"] = step(order=1, **policies)(lambda self, ctx: None)
            namespace["undo"] = compensates("go", **policies)(lambda self, ctx: None)

        saga_class: type[Saga] = types.new_class("Shape", (Saga,), keywords, body)
        return saga_class

    plain = shape({})
    with_policies = shape({"retry": Retry(attempts=7), "timeout": 3}, deadline=9)
    assert dict(plan(with_policies).policies) == {
        "go": ActionPolicy(retry=Retry(attempts=7), timeout=3),
        "undo": ActionPolicy(retry=Retry(attempts=7), timeout=3),
    }
    assert plan(with_policies).deadline == 9
    assert plan(with_policies).fingerprint == plan(plain).fingerprint
    assert plan(with_policies).fingerprint == compiled_definition(plain).fingerprint
    renamed = types.new_class(
        "Shape", (Saga,), {}, lambda ns: ns.update(go=step(order=1)(lambda self, ctx: None))
    )
    assert plan(renamed).fingerprint != plan(plain).fingerprint  # the check can fail


def compiled_definition(saga_class: type[Saga]) -> Any:
    found = dsl.compiled(saga_class)
    assert found is not None
    return found.definition


def test_policies_do_not_change_a_new_setup_fingerprint() -> None:
    actions = {"go": noop, "undo": noop}
    plain = declsaga.new(actions, compensators={"go": "undo"})
    with_policies = declsaga.new(
        actions,
        compensators={"go": "undo"},
        retries={"go": Retry(attempts=7), "undo": Retry()},
        timeouts={"go": 3},
        deadline=9,
    )
    other = declsaga.new(actions)
    assert with_policies.definition.fingerprint == plain.definition.fingerprint  # type: ignore[attr-defined]
    assert other.definition.fingerprint != plain.definition.fingerprint  # type: ignore[attr-defined]


def test_a_named_setup_may_be_registered_again_with_other_policies() -> None:
    name = "tests.test_policy_definitions.same-shape"
    declsaga.new({"go": noop}, name=name, timeouts={"go": 1})
    again = declsaga.new({"go": noop}, name=name, timeouts={"go": 2}, deadline=5)
    assert again._declsaga_policy("go") == ActionPolicy(timeout=2)  # type: ignore[attr-defined]
