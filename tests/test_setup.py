"""SPEC §2: `new()`, `Action`, the `Setup` protocol and `validate()`."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest

import declsaga
from declsaga import Action, ActionNotFound, EmptyActionName, InvalidSetup, UsageError


def noop(ctx: declsaga.Context) -> None:
    return None


async def anoop(ctx: declsaga.Context) -> None:
    return None


def test_sequence_defaults_to_the_first_action_only() -> None:
    setup = declsaga.new({"foo": noop, "bar": noop, "baz": noop})
    assert list(setup.sequence()) == ["foo"]


def test_explicit_sequence_wins_over_start_with() -> None:
    setup = declsaga.new(
        {"foo": noop, "bar": noop, "baz": noop}, sequence=["baz", "foo"], start_with="bar"
    )
    assert list(setup.sequence()) == ["baz", "foo"]


def test_start_with_wins_over_the_first_action() -> None:
    setup = declsaga.new({"foo": noop, "bar": noop}, start_with="bar")
    assert list(setup.sequence()) == ["bar"]


@pytest.mark.parametrize("start_with", [None, ""])
def test_empty_start_with_counts_as_not_given(start_with: str | None) -> None:
    setup = declsaga.new({"foo": noop, "bar": noop}, start_with=start_with)
    assert list(setup.sequence()) == ["foo"]


def test_empty_explicit_sequence_counts_as_not_given() -> None:
    setup = declsaga.new({"foo": noop, "bar": noop}, sequence=[], start_with="bar")
    assert list(setup.sequence()) == ["bar"]


def test_no_actions_means_an_empty_sequence_whatever_else_was_given() -> None:
    setup = declsaga.new({}, sequence=["foo"], start_with="bar")
    assert list(setup.sequence()) == []
    declsaga.validate(setup)  # nothing to check


def test_first_action_named_empty_is_rejected_by_validate() -> None:
    setup = declsaga.new({"": noop, "bar": noop})
    assert list(setup.sequence()) == [""]
    with pytest.raises(
        EmptyActionName, match=r"^The action name at position 0 of the sequence is empty: ''\.$"
    ):
        declsaga.validate(setup)


def test_whitespace_name_is_empty() -> None:
    setup = declsaga.new({"foo": noop, "  ": noop}, sequence=["foo", "  "])
    with pytest.raises(EmptyActionName) as caught:
        declsaga.validate(setup)
    assert caught.value.name == "  "
    assert caught.value.position == 1
    assert isinstance(caught.value, InvalidSetup)
    assert isinstance(caught.value, ValueError)


def test_lookups() -> None:
    setup = declsaga.new(
        {"foo": noop, "fix-foo": noop, "bar": noop}, compensators={"foo": "fix-foo", "bar": ""}
    )
    assert setup.compensator("foo") == "fix-foo"
    assert setup.compensator("bar") is None  # an empty string counts as none
    assert setup.compensator("nope") is None
    found = setup.action("foo")
    assert found == Action("foo", noop)
    assert found is not None and found.fn is noop
    assert setup.action("nope") is None


def test_actions_from_an_iterable_later_one_wins_and_first_keeps_its_place() -> None:
    def first(ctx: declsaga.Context) -> str:
        return "first"

    def second(ctx: declsaga.Context) -> str:
        return "second"

    setup = declsaga.new([Action("foo", first), Action("bar", noop), Action("foo", second)])
    assert list(setup.sequence()) == ["foo"]
    found = setup.action("foo")
    assert found is not None and found.fn is second


def test_action_run_calls_fn_with_ctx() -> None:
    seen: list[object] = []
    marker = object()

    def record(ctx: declsaga.Context) -> str:
        seen.append(ctx)
        return "done"

    act = Action("foo", record)
    assert act.run(marker) == "done"  # type: ignore[arg-type]
    assert seen == [marker]


def test_action_is_frozen_and_knows_async() -> None:
    act = Action("foo", anoop)
    assert act.is_async
    assert not Action("foo", noop).is_async
    with pytest.raises(AttributeError):
        act.name = "bar"  # type: ignore[misc]


def test_async_callable_objects_and_partials_are_async() -> None:
    class Callable:
        async def __call__(self, ctx: declsaga.Context) -> None:
            return None

    assert Action("a", Callable()).is_async
    assert Action("b", functools.partial(anoop)).is_async


def test_setup_is_immutable_and_reusable() -> None:
    actions = {"foo": noop}
    setup = declsaga.new(actions, sequence=["foo"])
    actions["bar"] = noop
    assert setup.action("bar") is None
    with pytest.raises(AttributeError):
        setup.extra = 1  # type: ignore[attr-defined]


def test_validate_reports_the_first_problem_in_order() -> None:
    setup = declsaga.new(
        {"foo": noop, "bar": noop},
        sequence=["foo", "missing", "bar"],
        compensators={"foo": "fix-foo"},
    )
    with pytest.raises(
        ActionNotFound, match=r"^No action named 'fix-foo' \(the compensator of 'foo'\)\.$"
    ) as caught:
        declsaga.validate(setup)
    assert caught.value.name == "fix-foo"
    assert isinstance(caught.value, LookupError)


def test_validate_unknown_sequence_name() -> None:
    setup = declsaga.new({"foo": noop}, sequence=["foo", "bar"])
    with pytest.raises(ActionNotFound, match=r"^No action named 'bar' \(in the sequence\)\.$"):
        declsaga.validate(setup)


def test_validate_ignores_actions_reached_only_through_ctx_run() -> None:
    setup = declsaga.new({"foo": noop, "nested": noop}, compensators={"nested": "missing"})
    declsaga.validate(setup)


BAD_NEW: list[tuple[dict[str, Any], str]] = [
    ({"actions": {"foo": 42}}, "Action 'foo' must be callable, got 42 (int)."),
    ({"actions": {1: noop}}, "An action name must be a string, got 1 (int)."),
    (
        {"actions": [Action("foo", noop), "bar"]},
        "actions must hold only Action values, got 'bar' (str).",
    ),
    (
        {"actions": "foo"},
        "actions must be a mapping of name to callable or an iterable of Action, got 'foo' (str).",
    ),
    (
        {"actions": {"foo": noop}, "sequence": "foo"},
        "sequence must be a list of action names, got 'foo' (str).",
    ),
    (
        {"actions": {"foo": noop}, "sequence": ["foo", 2]},
        "A sequence name must be a string, got 2 (int).",
    ),
    ({"actions": {"foo": noop}, "start_with": 3}, "start_with must be a string, got 3 (int)."),
    (
        {"actions": {"foo": noop}, "compensators": ["foo"]},
        "compensators must be a mapping of action name to compensator name, got ['foo'] (list).",
    ),
    (
        {"actions": {"foo": noop}, "compensators": {"foo": noop}},
        "The compensator of 'foo' must be a string, got",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_NEW)
def test_new_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(message)) as caught:
        declsaga.new(**kwargs)
    assert isinstance(caught.value, TypeError)


def test_action_rejects_bad_arguments() -> None:
    with pytest.raises(
        UsageError, match=r"^Action 'foo' must be callable, got None \(NoneType\)\.$"
    ):
        Action("foo", None)  # type: ignore[arg-type]
    with pytest.raises(
        UsageError, match=r"^An action name must be a string, got b'x' \(bytes\)\.$"
    ):
        Action(b"x", noop)  # type: ignore[arg-type]


def test_validate_rejects_what_is_not_a_setup() -> None:
    with pytest.raises(
        UsageError,
        match=r"^validate\(\) needs a Setup \(sequence\(\), compensator\(name\), action\(name\)\), "
        r"got 42 \(int\)\.$",
    ):
        declsaga.validate(42)  # type: ignore[arg-type]


def test_hand_written_setup_classes_are_setups() -> None:
    class Mine:
        def sequence(self) -> list[str]:
            return ["a"]

        def compensator(self, name: str) -> str | None:
            return None

        def action(self, name: str) -> Action | None:
            return Action(name, noop) if name == "a" else None

    assert isinstance(Mine(), declsaga.Setup)
    declsaga.validate(Mine())
    assert declsaga.execute(Mine()).runs[0].action == "a"
