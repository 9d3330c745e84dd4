"""The declarative DSL: `Saga` subclasses, compiled once into the `Setup` model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import FunctionType, MappingProxyType
from typing import (
    Any,
    ClassVar,
    Self,
    cast,
    dataclass_transform,
    final,
)

import attrs
from attr import attrib

from ._errors import UsageError, describe
from ._markers import (
    MARKER,
    ActionKind,
    BareCompensates,
    Marker,
    action,
    bare_compensates,
    compensates,
    definition_error,
    inner_function,
    not_plain,
    spell,
    step,
)
from ._policies import ActionPolicy, seconds_problem
from ._registry import Definition, register
from ._setup import STATIC_SETUP_CLASSES, Action, bound_action, is_async_callable

__all__ = [
    "ActionInfo",
    "ActionKind",
    "Saga",
    "SagaPlan",
    "action",
    "compensates",
    "compiled",
    "step",
]

_COMPILED = "__declsaga__"
# Set on a class just before attrs copies it into a slotted class, so that the
# metaclass recognises that copy and does not compile it a second time.
_REBUILD = "__declsaga_rebuild__"
_SETUP_METHODS = frozenset({"sequence", "compensator", "action"})
# Methods of Saga beyond the Setup protocol that the executor looks up with getattr():
# prefixed, so that they never clash with a saga's own fields (a `deadline` field, say)
# nor with what a hand-written setup class happens to define.
_POLICY_METHODS = frozenset(
    {"_declsaga_policies", "_declsaga_policy", "_declsaga_deadline", "_declsaga_groups"}
)
_RESERVED = _SETUP_METHODS | _POLICY_METHODS
# Keyword arguments accepted in `class X(Saga, ...)`.
_CLASS_OPTIONS: frozenset[str] = frozenset({"name", "deadline"})
_FACTORY: type = type(attrs.Factory(list))


# --- the compiled plan ---


@final
@attrs.frozen
class ActionInfo:
    """One action of a compiled saga class."""

    name: str  # the action name: what `Setup.action()` and `ctx.run()` take
    method: str  # the attribute that holds the method
    kind: ActionKind
    is_async: bool
    order: int | None  # steps only
    compensates: str | None  # compensators only: the action they undo
    defined_in: type  # the class whose body defines the method
    function: Callable[..., object] = attrs.field(repr=False)
    policy: ActionPolicy | None = None  # its retry= and timeout=, if either is given
    parallel: bool = False  # steps only: `@step(..., parallel=True)`


@final
@attrs.frozen
class SagaPlan:
    """What a `Saga` subclass compiles to; `declsaga.inspection.plan()` returns it."""

    saga: type[Saga]
    name: str  # the registered name: `class X(Saga, name=...)`, else module.QualName
    fingerprint: str  # of the sequence, compensators and action names (durable execution)
    sequence: tuple[str, ...]  # the step names, sorted by order
    steps: tuple[ActionInfo, ...]  # in sequence order
    actions: tuple[ActionInfo, ...]  # every action, base classes' definitions first
    compensators: Mapping[str, str] = attrs.field(hash=False)  # action -> compensator
    # action -> its retry= and timeout=, for the actions that have either; not part of
    # the fingerprint: changing a policy does not change what recovery relies on.
    policies: Mapping[str, ActionPolicy] = attrs.field(hash=False, factory=dict)
    deadline: float | None = None  # seconds: `class X(Saga, deadline=...)`, inherited
    # The parallel groups: the step names of each order whose steps say parallel=True,
    # sorted by name (their order in the sequence), groups in sequence order.
    groups: tuple[tuple[str, ...], ...] = ()


@final
@attrs.frozen
class _Compiled:
    """A saga class's plan, shaped for the `Setup` methods on the executor's hot path."""

    sequence: tuple[str, ...]
    compensators: dict[str, str]
    # action name -> (function, is_async): a bound method is async exactly when its
    # function is, so is_async is computed once per class, not on every step.
    functions: dict[str, tuple[Callable[..., object], bool]]
    policies: dict[str, ActionPolicy]
    deadline: float | None
    plan: SagaPlan
    definition: Definition
    groups: tuple[tuple[str, ...], ...]


def compiled(saga_class: type) -> _Compiled | None:
    """The compiled plan of `saga_class` itself (not inherited), or None."""
    found: _Compiled | None = saga_class.__dict__.get(_COMPILED)
    return found


@final
@attrs.frozen
class _Entry:
    method: str
    defined_in: type
    function: FunctionType
    marker: Marker

    @property
    def name(self) -> str:
        return self.marker.name or self.method

    def label(self, cls: type) -> str:
        if self.defined_in is cls:
            return self.method
        return f"{self.method} (inherited from {self.defined_in.__qualname__})"


def _collect(cls: type, namespace: Mapping[str, object]) -> list[_Entry]:
    """The marked methods of `cls`, the most derived definition of each name counting."""
    owner = cls.__qualname__
    latest: dict[str, tuple[type, object]] = {}
    for klass in reversed(cls.__mro__[1:-1]):
        latest.update((key, (klass, value)) for key, value in vars(klass).items())
    # The class body, not vars(cls): attrs replaces cached properties in its copy.
    latest.update((key, (cls, value)) for key, value in namespace.items())
    # A field overrides an inherited method like any other attribute, default or not.
    latest.update((field.name, (cls, field)) for field in attrs.fields(cls) if not field.inherited)
    entries = []
    for key, (klass, value) in latest.items():
        where = "" if klass is cls else f" (inherited from {klass.__qualname__})"
        if key in _RESERVED:
            if klass is not Saga:
                kind = "method" if callable(value) else "attribute"
                raise definition_error(
                    owner,
                    f"{kind} {key}{where} shadows the Setup method {key}() that the "
                    "executor calls; rename it",
                )
        elif isinstance(value, BareCompensates):
            raise bare_compensates(owner, key + where)
        elif isinstance(value, FunctionType):
            marker = value.__dict__.get(MARKER)
            if marker is not None:
                entries.append(_Entry(key, klass, value, marker))
        elif (inner := inner_function(value)) is not None and MARKER in inner.__dict__:
            raise not_plain(owner, inner.__dict__[MARKER].spelling(), key + where, value)
    return entries


def _compile(cls: type[Saga], namespace: Mapping[str, object], saga_name: str) -> _Compiled:
    owner = cls.__qualname__
    entries = _collect(cls, namespace)
    by_name: dict[str, _Entry] = {}
    by_order: dict[int, list[_Entry]] = {}
    for entry in entries:
        name, label = entry.name, entry.label(cls)
        if name in _SETUP_METHODS:
            raise definition_error(
                owner,
                f"method {label} has the action name {name!r}, which shadows the Setup "
                f"method {name}(); choose another name=",
            )
        if (other := by_name.get(name)) is not None:
            raise definition_error(
                owner,
                f"methods {other.label(cls)} and {label} both have the action name {name!r}; "
                "give one of them another name=",
            )
        by_name[name] = entry
        order = entry.marker.order
        if order is not None:
            same_order = by_order.setdefault(order, [])
            if same_order:
                _check_shared_order(cls, order, same_order[0], entry)
            same_order.append(entry)
    for order, same_order in by_order.items():
        if same_order[0].marker.parallel and len(same_order) == 1:
            raise definition_error(
                owner,
                f"step {same_order[0].label(cls)} has parallel=True, but no other step has "
                f"order {order}; a parallel group is two or more steps of one order: add "
                "another, or drop parallel=True",
            )
    compensators: dict[str, str] = {}
    compensator_of: dict[str, _Entry] = {}
    for entry in entries:
        target = entry.marker.target
        if target is None:
            continue
        if target not in by_name:
            raise definition_error(
                owner, f"method {entry.label(cls)} {_unknown(target, entries, cls)}"
            )
        if (other := compensator_of.get(target)) is not None:
            raise definition_error(
                owner,
                f"action {target!r} has two compensators, methods {other.label(cls)} and "
                f"{entry.label(cls)}; keep one",
            )
        compensator_of[target] = entry
        compensators[target] = entry.name
    return _freeze(cls, saga_name, entries, compensators)


def _check_shared_order(cls: type, order: int, first: _Entry, entry: _Entry) -> None:
    """Two steps of one order: both parallel=True (one group), or a DefinitionError."""
    if first.marker.parallel and entry.marker.parallel:
        return
    owner = cls.__qualname__
    if not first.marker.parallel and not entry.marker.parallel:
        raise definition_error(
            owner,
            f"steps {first.label(cls)} and {entry.label(cls)} both have order {order}; "
            "give each step its own order",
        )
    grouped, alone = (first, entry) if first.marker.parallel else (entry, first)
    raise definition_error(
        owner,
        f"step {grouped.label(cls)} has parallel=True and order {order}, which step "
        f"{alone.label(cls)} has without parallel=True; the steps of a parallel group all "
        f"say parallel=True: add it to {alone.method}, or give one of them another order",
    )


def _unknown(target: str, entries: list[_Entry], cls: type) -> str:
    text = f"compensates {target!r}, but the saga has no action named {target!r}"
    renamed = next((entry for entry in entries if entry.method == target), None)
    if renamed is not None:
        fix = spell("compensates", renamed.name)
        return f"{text}; method {target} has the action name {renamed.name!r}: write {fix}"
    if isinstance(getattr(cls, target, None), FunctionType):
        return f"{text}; method {target} is not decorated as a step or action"
    return text


def _policy(marker: Marker) -> ActionPolicy | None:
    if marker.retry is None and marker.timeout is None:
        return None
    return ActionPolicy(retry=marker.retry, timeout=marker.timeout)


def _freeze(
    cls: type[Saga], saga_name: str, entries: list[_Entry], compensators: dict[str, str]
) -> _Compiled:
    infos = {
        entry.name: ActionInfo(
            name=entry.name,
            method=entry.method,
            kind=entry.marker.kind,
            is_async=is_async_callable(entry.function),
            order=entry.marker.order,
            compensates=entry.marker.target,
            defined_in=entry.defined_in,
            function=entry.function,
            policy=_policy(entry.marker),
            parallel=entry.marker.parallel,
        )
        for entry in entries
    }
    policies = {name: info.policy for name, info in infos.items() if info.policy is not None}
    # By order; the members of a parallel group (one order) by name, so that moving
    # methods around in the class body leaves the sequence and the fingerprint alone.
    steps = sorted(
        (i for i in infos.values() if i.kind == "step"), key=lambda i: (i.order or 0, i.name)
    )
    sequence = tuple(info.name for info in steps)
    grouped: dict[int, list[str]] = {}
    for info in steps:
        if info.parallel:
            grouped.setdefault(info.order or 0, []).append(info.name)
    groups = tuple(tuple(names) for names in grouped.values())
    definition = Definition.of(sequence, compensators, infos, groups)
    plan = SagaPlan(
        saga=cls,
        name=saga_name,
        fingerprint=definition.fingerprint,
        sequence=sequence,
        steps=tuple(steps),
        actions=tuple(infos.values()),
        compensators=MappingProxyType(compensators),
        policies=MappingProxyType(policies),
        groups=groups,
    )
    functions = {name: (info.function, info.is_async) for name, info in infos.items()}
    return _Compiled(sequence, compensators, functions, policies, None, plan, definition, groups)


def _check_fields(cls: type) -> None:
    for field in attrs.fields(cls):
        if field.inherited:
            continue
        if field.name in _RESERVED:
            raise definition_error(
                cls.__qualname__,
                f"field {field.name} shadows the Setup method {field.name}() that the "
                "executor calls; rename the field",
            )
        default = field.default
        if default is attrs.NOTHING or isinstance(default, _FACTORY):
            continue
        # Like dataclasses: an unhashable value is mutable, and the spec's containers
        # stay mutable in subclasses that add a __hash__.
        if isinstance(default, list | dict | set) or type(default).__hash__ is None:
            raise definition_error(
                cls.__qualname__,
                f"field {field.name} has a mutable default, {describe(default)}, that all "
                "instances would share; use attrs.field(factory=...) instead, "
                f"e.g. attrs.field(factory={type(default).__name__})",
            )


def _deadline(owner: str, cls: type, options: Mapping[str, object]) -> float | None:
    """The `deadline=` class keyword if given (None removes an inherited deadline), else
    the deadline of the nearest compiled base class."""
    if "deadline" not in options:
        return next(
            (found.deadline for base in cls.__mro__[1:] if (found := compiled(base)) is not None),
            None,
        )
    deadline = options["deadline"]
    if deadline is not None and (problem := seconds_problem(deadline)) is not None:
        raise definition_error(owner, f"the deadline= class keyword {problem}")
    return cast("float | None", deadline)


# --- the base class ---


@dataclass_transform(kw_only_default=True, eq_default=False, field_specifiers=(attrs.field, attrib))
class _SagaMeta(type):
    """Compiles each `Saga` subclass once, when its class statement runs."""

    def __new__(
        mcs,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        /,
        **options: object,
    ) -> _SagaMeta:
        if namespace.pop(_REBUILD, False) or not any(isinstance(b, _SagaMeta) for b in bases):
            # attrs' slotted copy of a class being compiled below, or Saga itself.
            return super().__new__(mcs, name, bases, namespace)
        qualname = namespace.get("__qualname__", name)
        for option in sorted(options.keys() - _CLASS_OPTIONS):
            accepted = ", ".join(sorted(_CLASS_OPTIONS)) or "none"
            raise definition_error(
                qualname,
                f"unknown class keyword argument {option}={options[option]!r}; "
                f"accepted: {accepted}",
            )
        draft = super().__new__(mcs, name, bases, namespace)
        setattr(draft, _REBUILD, True)
        try:
            cls = attrs.define(draft, slots=True, eq=False, kw_only=True, auto_attribs=True)
        except attrs.exceptions.UnannotatedAttributeError as error:
            names = str(error).rpartition(": ")[2].rstrip(".")  # attrs lists them last
            raise definition_error(
                qualname,
                f"attrs.field() without a type annotation in {names}; fields are annotated "
                "class attributes, e.g. x: int = attrs.field(default=0)",
            ) from None
        _check_fields(cls)
        registered = options.get("name")
        if registered is not None and (not isinstance(registered, str) or not registered.strip()):
            raise definition_error(
                qualname,
                f"the name= class keyword must be a non-empty string, got {describe(registered)}",
            )
        saga_name = registered or f"{cls.__module__}.{qualname}"
        deadline = _deadline(qualname, cls, options)
        plan = _compile(cast("type[Saga]", cls), namespace, saga_name)
        if deadline is not None:
            plan = attrs.evolve(
                plan, deadline=deadline, plan=attrs.evolve(plan.plan, deadline=deadline)
            )
        conflict = register(
            saga_name, cls, f"class {cls.__module__}.{qualname}", explicit=registered is not None
        )
        if conflict is not None:
            raise definition_error(qualname, f"cannot register as {saga_name!r}: {conflict}")
        setattr(cls, _COMPILED, plan)
        STATIC_SETUP_CLASSES.add(cls)  # its Setup methods answer from the plan alone
        return cls


class Saga(metaclass=_SagaMeta):
    """Base class of declarative sagas; an instance is a `Setup` bound to itself.

    Subclasses become slotted attrs classes: attrs builds a copy of each class, so
    `__init_subclass__` runs for the draft and for the copy; `__attrs_init_subclass__`
    runs once, for the final class.
    """

    __slots__ = ()
    __declsaga__: ClassVar[_Compiled]
    # Tells type checkers that subclasses work with attrs.fields(), attrs.evolve(), ...
    __attrs_attrs__: ClassVar[tuple[attrs.Attribute[Any], ...]]

    def __new__(cls, *args: object, **kwargs: object) -> Self:
        if cls is Saga:
            raise UsageError(
                "Saga is the base class of declarative sagas: subclass it and "
                "instantiate the subclass."
            )
        return super().__new__(cls)

    # The three Setup methods: dict lookups in the class's compiled plan. Actions are
    # bound on each call, never cached, so that copies get their own.
    def sequence(self) -> tuple[str, ...]:
        """The step names, sorted by their order."""
        return self.__declsaga__.sequence

    def compensator(self, name: str) -> str | None:
        """The name of the compensator of action `name`, or None."""
        return self.__declsaga__.compensators.get(name)

    def action(self, name: str) -> Action | None:
        """The action called `name`, bound to this instance, or None."""
        found = self.__declsaga__.functions.get(name)
        if found is None:
            return None
        function, is_async = found
        return bound_action(name, function.__get__(self), is_async)

    # Beyond the Setup protocol: the executor looks these up with getattr(), and calls
    # _declsaga_policy on every step, so they stay lookups in the compiled plan.
    def _declsaga_policies(self) -> Mapping[str, ActionPolicy]:
        """Every action's retry= and timeout=, by action name (read-only; empty if none)."""
        return self.__declsaga__.plan.policies

    def _declsaga_policy(self, name: str) -> ActionPolicy | None:
        """The retry= and timeout= of action `name`, or None if it has neither."""
        return self.__declsaga__.policies.get(name)

    def _declsaga_deadline(self) -> float | None:
        """The saga's deadline in seconds (`class X(Saga, deadline=...)`), or None."""
        return self.__declsaga__.deadline

    def _declsaga_groups(self) -> tuple[tuple[str, ...], ...]:
        """The parallel step groups (`@step(..., parallel=True)`), each a run of
        consecutive names of the sequence; empty if none."""
        return self.__declsaga__.groups
