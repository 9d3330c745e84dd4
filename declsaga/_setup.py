"""The `Setup` model of goes' saga package: a sequence, compensator lookup, action lookup."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, cast, final, runtime_checkable

import attrs

from ._errors import ActionNotFound, EmptyActionName, InvalidSetup, UsageError, describe
from ._policies import ActionPolicy, Retry, retry_problem, seconds_problem
from ._registry import Definition, register

if TYPE_CHECKING:
    from ._context import Context

__all__ = [
    "Action",
    "ActionFn",
    "FunctionalSetup",
    "Setup",
    "check_setup",
    "group_spans",
    "is_async_callable",
    "new",
    "validate",
]

ActionFn = Callable[["Context"], object]


def is_async_callable(fn: object) -> bool:
    """True for coroutine functions, partials of them and objects with an async __call__.

    A callable classified as sync may still return an awaitable; the executor awaits it.
    """
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we need the method, not callable()
    return call is not None and inspect.iscoroutinefunction(call)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise UsageError(f"{what} must be a string, got {describe(name)}.")
    return name


def _check_fn(name: str, fn: object) -> None:
    if not callable(fn):
        raise UsageError(f"Action {name!r} must be callable, got {describe(fn)}.")


@final
@attrs.frozen
class Action:
    """A named action: `fn(ctx)` does the work, sync or async."""

    name: str
    fn: ActionFn
    is_async: bool = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_name(self.name, "An action name")
        _check_fn(self.name, self.fn)
        object.__setattr__(self, "is_async", is_async_callable(self.fn))

    def run(self, ctx: Context) -> object:
        """Call the action's function with `ctx`; async functions return a coroutine."""
        return self.fn(ctx)


# Action's slots, set directly by bound_action (its frozen __setattr__ refuses).
_set_name = Action.__dict__["name"].__set__
_set_fn = Action.__dict__["fn"].__set__
_set_is_async = Action.__dict__["is_async"].__set__
_new_object = object.__new__


def bound_action(name: str, fn: ActionFn, is_async: bool) -> Action:
    """An `Action` whose name, callable and kind were checked already (a compiled saga's
    method bound to its instance): `Action(...)` re-runs the checks, and its
    is_async_callable() costs microseconds on every step."""
    action = _new_object(Action)
    _set_name(action, name)
    _set_fn(action, fn)
    _set_is_async(action, is_async)
    return action


@runtime_checkable
class Setup(Protocol):
    """What the executor runs: goes' `saga.Setup`."""

    def sequence(self) -> Sequence[str]:
        """The names of the top-level actions, in the order they run."""
        ...

    def compensator(self, name: str) -> str | None:
        """The name of the compensator of action `name`, or None."""
        ...

    def action(self, name: str) -> Action | None:
        """The action called `name`, or None."""
        ...


@final
class FunctionalSetup:
    """The immutable setup that `new()` returns."""

    __slots__ = (
        "_actions",
        "_compensators",
        "_deadline",
        "_groups",
        "_policies",
        "_sequence",
        "_valid",
        "definition",
        "name",
    )

    def __init__(
        self,
        actions: Mapping[str, Action],
        sequence: tuple[str, ...],
        compensators: Mapping[str, str],
        name: str | None,
        *,
        policies: Mapping[str, ActionPolicy] | None = None,
        deadline: float | None = None,
        groups: tuple[tuple[str, ...], ...] = (),
    ) -> None:
        self._actions = actions
        self._sequence = sequence
        self._compensators = compensators
        self._policies: Mapping[str, ActionPolicy] = MappingProxyType(dict(policies or {}))
        self._deadline = deadline
        self._groups = groups
        self.name = name  # the registered name, for durable execution
        self._valid = False  # set by the first validate() that passes: it is immutable
        # Policies are left out: they do not change what recovery relies on. Groups are
        # in: a journal with several steps in flight needs them to be read back.
        self.definition = Definition.of(sequence, compensators, actions, groups)

    def sequence(self) -> Sequence[str]:
        return self._sequence

    def compensator(self, name: str) -> str | None:
        return self._compensators.get(name) or None

    def action(self, name: str) -> Action | None:
        return self._actions.get(name)

    # Beyond the Setup protocol, as on Saga instances: the executor looks them up with
    # getattr().
    def _declsaga_policies(self) -> Mapping[str, ActionPolicy]:
        """Every action's retry and timeout, by action name (read-only; empty if none)."""
        return self._policies

    def _declsaga_policy(self, name: str) -> ActionPolicy | None:
        """The retry and timeout of action `name`, or None if it has neither."""
        return self._policies.get(name)

    def _declsaga_deadline(self) -> float | None:
        """The saga's deadline in seconds, or None."""
        return self._deadline

    def _declsaga_groups(self) -> tuple[tuple[str, ...], ...]:
        """The parallel step groups: each a run of consecutive names of the sequence."""
        return self._groups

    def __repr__(self) -> str:
        extra = f" parallel={[list(group) for group in self._groups]!r}" if self._groups else ""
        if self._policies:
            extra += f" policies={dict(self._policies)!r}"
        if self._deadline is not None:
            extra += f" deadline={self._deadline!r}"
        return (
            f"<setup sequence={list(self._sequence)!r} actions={list(self._actions)!r} "
            f"compensators={dict(self._compensators)!r}{extra}>"
        )


def _collect_actions(actions: object) -> dict[str, Action]:
    if isinstance(actions, Mapping):
        collected: dict[str, Action] = {}
        for name, fn in actions.items():
            collected[name] = Action(_check_name(name, "An action name"), fn)
        return collected
    if isinstance(actions, str | bytes) or not isinstance(actions, Iterable):
        raise UsageError(
            "actions must be a mapping of name to callable or an iterable of Action, "
            f"got {describe(actions)}."
        )
    collected = {}
    for item in actions:
        if not isinstance(item, Action):
            raise UsageError(f"actions must hold only Action values, got {describe(item)}.")
        # A later action with the same name wins; the first action keeps its place.
        collected[item.name] = item
    return collected


def _collect_sequence(sequence: object) -> tuple[str, ...]:
    if sequence is None:
        return ()
    if isinstance(sequence, str | bytes) or not isinstance(sequence, Iterable):
        raise UsageError(f"sequence must be a list of action names, got {describe(sequence)}.")
    return tuple(_check_name(name, "A sequence name") for name in sequence)


def _collect_compensators(compensators: object) -> dict[str, str]:
    if compensators is None:
        return {}
    if not isinstance(compensators, Mapping):
        raise UsageError(
            "compensators must be a mapping of action name to compensator name, "
            f"got {describe(compensators)}."
        )
    collected: dict[str, str] = {}
    for name, compensator in compensators.items():
        _check_name(name, "A compensated action name")
        if compensator is None:
            continue
        collected[name] = _check_name(compensator, f"The compensator of {name!r}")
    return collected


def _collect_policies(
    actions: Mapping[str, Action], retries: object, timeouts: object
) -> dict[str, ActionPolicy]:
    """action name -> its policy, for the actions given a retry or a timeout."""
    checked: dict[str, dict[str, object]] = {}
    for what, argument, values, given, problem_of in (
        ("retry", "retries", "Retry", retries, retry_problem),
        ("timeout", "timeouts", "seconds", timeouts, seconds_problem),
    ):
        if given is None:
            continue
        if not isinstance(given, Mapping):
            raise UsageError(
                f"{argument} must be a mapping of action name to {values}, got {describe(given)}."
            )
        for action_name, value in given.items():
            if not isinstance(action_name, str) or action_name not in actions:
                raise UsageError(
                    f"new() got a {what} for {action_name!r}, which is not one of its actions."
                )
            if (problem := problem_of(value)) is not None:
                raise UsageError(f"new() got a {what} for {action_name!r} that {problem}.")
            checked.setdefault(action_name, {})[what] = value
    return {
        action_name: ActionPolicy(
            retry=cast("Retry | None", found.get("retry")),
            timeout=cast("float | None", found.get("timeout")),
        )
        for action_name, found in checked.items()
    }


def _collect_groups(parallel: object, sequence: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """The parallel groups of `new()`, each in sequence order, sorted by their place."""
    if parallel is None:
        return ()
    if isinstance(parallel, str | bytes) or not isinstance(parallel, Iterable):
        raise UsageError(
            "parallel must be a list of groups of action names, e.g. "
            f"parallel=[('charge', 'reserve')], got {describe(parallel)}."
        )
    shown = list(sequence)
    group_of: dict[str, tuple[str, ...]] = {}
    spans: list[tuple[int, tuple[str, ...]]] = []
    for given in parallel:
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise UsageError(
                f"new() got the parallel group {given!r}; a group is a tuple of two or more "
                "action names of the sequence, e.g. ('charge', 'reserve')."
            )
        group = tuple(_check_name(name, "A name in a parallel group") for name in given)
        if len(group) < 2:
            raise UsageError(
                f"new() got the parallel group {group!r}; a group runs two or more actions "
                "of the sequence together."
            )
        for name in group:
            if group.count(name) > 1:
                raise UsageError(
                    f"new() got the parallel group {group!r}, which names {name!r} twice."
                )
            if name not in sequence:
                raise UsageError(
                    f"new() got the parallel group {group!r}, but {name!r} is not in the "
                    f"sequence {shown!r}."
                )
            if sequence.count(name) > 1:
                raise UsageError(
                    f"new() got the parallel group {group!r}, but {name!r} appears more than "
                    f"once in the sequence {shown!r}, so its place is ambiguous."
                )
            if (other := group_of.get(name)) is not None:
                raise UsageError(
                    f"new() got {name!r} in two parallel groups, {other!r} and {group!r}; "
                    "an action belongs to one group at most."
                )
            group_of[name] = group
        places = sorted(sequence.index(name) for name in group)
        if places[-1] - places[0] != len(group) - 1:
            raise UsageError(
                f"new() got the parallel group {group!r}, whose names are not consecutive in "
                f"the sequence {shown!r}; a group takes consecutive places of the sequence."
            )
        spans.append((places[0], tuple(sequence[place] for place in places)))
    return tuple(group for _, group in sorted(spans))


def group_spans(sequence: Sequence[str], groups: Iterable[Sequence[str]]) -> dict[int, int]:
    """Where each parallel group sits in `sequence`: its first position -> the position
    after its last. `InvalidSetup` for a group that is not two or more consecutive names
    of the sequence, apart from the other groups (possible only in a hand-written setup:
    `new()` and the DSL check theirs)."""
    names = tuple(sequence)
    spans: dict[int, int] = {}
    taken: set[int] = set()
    for given in groups:
        group = tuple(given)
        size = len(group)
        start = next(
            (
                place
                for place in range(len(names) - size + 1)
                if names[place : place + size] == group
                and taken.isdisjoint(range(place, place + size))
            ),
            None,
        )
        if size < 2 or start is None:
            raise InvalidSetup(
                f"The parallel group {list(group)!r} is not two or more consecutive names of "
                f"the sequence {list(names)!r} outside the other groups."
            )
        spans[start] = start + size
        taken.update(range(start, start + size))
    return spans


def new(
    actions: Mapping[str, ActionFn] | Iterable[Action],
    *,
    sequence: Iterable[str] | None = None,
    start_with: str | None = None,
    compensators: Mapping[str, str | None] | None = None,
    name: str | None = None,
    retries: Mapping[str, Retry] | None = None,
    timeouts: Mapping[str, float] | None = None,
    deadline: float | None = None,
    parallel: Iterable[Iterable[str]] | None = None,
) -> Setup:
    """Build an immutable `Setup` by hand, with goes' sequence precedence.

    `name` registers the setup under that name, so that a durable executor can find it
    again after a crash. `retries` and `timeouts` (seconds) map action names to their
    policies; `deadline` (seconds) bounds the whole saga. Policies do not change the
    setup's fingerprint. `parallel` lists groups of consecutive sequence names that run
    together, e.g. `parallel=[("charge", "reserve")]`; groups are part of the fingerprint.
    """
    collected = _collect_actions(actions)
    explicit = _collect_sequence(sequence)
    if start_with is not None:
        _check_name(start_with, "start_with")
    compensator_names = _collect_compensators(compensators)
    if not collected:
        ordered: tuple[str, ...] = ()
    elif explicit:
        ordered = explicit
    elif start_with:
        ordered = (start_with,)
    else:
        ordered = (next(iter(collected)),)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UsageError(f"name must be a non-empty string, got {describe(name)}.")
    policies = _collect_policies(collected, retries, timeouts)
    if deadline is not None and (problem := seconds_problem(deadline)) is not None:
        raise UsageError(f"new() got a deadline that {problem}.")
    groups = _collect_groups(parallel, ordered)
    setup = FunctionalSetup(
        MappingProxyType(collected),
        ordered,
        MappingProxyType(compensator_names),
        name,
        policies=policies,
        deadline=deadline,
        groups=groups,
    )
    if name is not None:
        fingerprint = setup.definition.fingerprint
        conflict = register(name, setup, f"a setup with fingerprint {fingerprint}", explicit=True)
        if conflict is not None:
            raise UsageError(
                f"new(name={name!r}) cannot register this setup (fingerprint {fingerprint}): "
                f"{conflict}; give it another name."
            )
    return setup


# Classes whose instances are known to be setups: a protocol isinstance() check costs
# microseconds, which the executor would pay on every execution.
_SETUP_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()
_SETUP_METHODS = ("sequence", "compensator", "action")
# Classes whose instances all answer the Setup methods alike (compiled Saga classes,
# registered by the DSL), and those of them that passed validate() once: validating
# their instances again would give the same answer.
STATIC_SETUP_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()
_VALID_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()


def check_setup(setup: object, api: str) -> Setup:
    """`setup` if it is a setup instance, else a UsageError that says what was passed."""
    cls = type(setup)
    if cls in _SETUP_CLASSES:
        return cast(Setup, setup)
    if isinstance(setup, type):
        raise UsageError(
            f"{api}() needs a setup instance, got the class {setup.__qualname__}: "
            f"instantiate it first, e.g. {setup.__qualname__}(...)."
        )
    if not isinstance(setup, Setup):
        raise UsageError(
            f"{api}() needs a Setup (sequence(), compensator(name), action(name)), "
            f"got {describe(setup)}."
        )
    if all(callable(getattr(cls, method, None)) for method in _SETUP_METHODS):
        _SETUP_CLASSES.add(cls)  # the class itself provides them, for every instance
    return setup


def validate(setup: Setup) -> None:
    """Check a setup's sequence and its compensators; raise for the first problem."""
    validate_checked(check_setup(setup, "validate"))


def validate_checked(setup: Setup) -> None:
    """`validate` of a setup that `check_setup` accepted."""
    if type(setup) is FunctionalSetup:
        if not setup._valid:
            _validate(setup)
            setup._valid = True
        return
    cls = type(setup)
    if cls not in _VALID_CLASSES:
        _validate(setup)
        if cls in STATIC_SETUP_CLASSES:
            _VALID_CLASSES.add(cls)


def _validate(setup: Setup) -> None:
    for position, name in enumerate(setup.sequence()):
        if not isinstance(name, str):
            raise UsageError(f"Sequence names must be strings, got {describe(name)}.")
        if not name.strip():
            raise EmptyActionName(name, position=position)
        if setup.action(name) is None:
            raise ActionNotFound(name, role="in the sequence")
        compensator = setup.compensator(name)
        if compensator and setup.action(compensator) is None:
            raise ActionNotFound(compensator, role=f"the compensator of {name!r}")
    groups_of = getattr(setup, "_declsaga_groups", None)
    if groups_of is not None:
        group_spans(setup.sequence(), groups_of())
