"""The DSL's decorators: they mark methods; the metaclass in `_dsl` checks the class.

Decorator-argument mistakes are found here, while the class body runs and before the
class exists, so the class name comes from the function's `__qualname__`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar, cast, final, overload

import attrs

from ._errors import DefinitionError, describe
from ._policies import Retry, retry_problem, seconds_problem

if TYPE_CHECKING:
    from ._context import Context

__all__ = [
    "MARKER",
    "ActionKind",
    "BareCompensates",
    "Marker",
    "action",
    "bare_compensates",
    "compensates",
    "definition_error",
    "inner_function",
    "not_plain",
    "spell",
    "step",
]

ActionKind = Literal["step", "compensator", "action"]
_M = TypeVar("_M", bound=Callable[[Any, "Context"], object])

MARKER = "__declsaga_marker__"
_MISSING: Any = object()
_STEP_FIX = "write @step(order=1)"


def _code(value: object) -> str:
    """`value` as the user would write it in a decorator call."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def spell(decorator: str, *args: object, **kwargs: object) -> str:
    parts = [_code(arg) for arg in args]
    parts += [f"{key}={_code(value)}" for key, value in kwargs.items() if value is not None]
    return f"@{decorator}({', '.join(parts)})" if parts else f"@{decorator}"


def definition_error(owner: str, text: str) -> DefinitionError:
    """A definition error about saga class `owner` (empty: not known)."""
    return DefinitionError(f"Saga {owner}: {text}." if owner else f"{text[:1].upper()}{text[1:]}.")


@final
@attrs.frozen
class Marker:
    """What a DSL decorator records on a function."""

    kind: ActionKind
    name: str | None
    order: int | None = None
    target: str | None = None
    retry: Retry | None = None  # checked by retry_problem
    timeout: float | None = None  # seconds, checked by seconds_problem
    parallel: bool = False  # steps only: a member of the parallel group of its order

    def spelling(self) -> str:
        policies = {"retry": self.retry, "timeout": self.timeout}
        if self.kind == "step":
            parallel = True if self.parallel else None
            return spell("step", order=self.order, name=self.name, parallel=parallel, **policies)
        if self.kind == "compensator":
            return spell("compensates", self.target, name=self.name, **policies)
        return spell("action", name=self.name)


# --- decorators: they only mark functions; the metaclass checks the whole class ---


def _owner(fn: FunctionType) -> str:
    """The qualified name of the class whose body defines `fn` ('' if none)."""
    owner = fn.__qualname__.rpartition(".")[0]
    return "" if owner.endswith("<locals>") else owner


def inner_function(value: object) -> FunctionType | None:
    """The function inside a staticmethod, classmethod or property, if any."""
    inner: object
    if isinstance(value, staticmethod | classmethod):
        inner = value.__func__
    elif isinstance(value, property):
        inner = next((f for f in (value.fget, value.fset, value.fdel) if f is not None), None)
    elif isinstance(value, functools.cached_property):
        inner = value.func
    else:
        return None
    return inner if isinstance(inner, FunctionType) else None


def _function(target: object, spelling: str) -> FunctionType:
    """`target` if a DSL decorator may mark it, else the DefinitionError that says why not."""
    if isinstance(target, FunctionType):
        return target
    inner = inner_function(target)
    if inner is not None:
        raise not_plain(_owner(inner), spelling, inner.__name__, target)
    raise DefinitionError(
        f"{spelling} can only decorate a function defined with def or async def, "
        f"got {describe(target)}."
    )


def not_plain(owner: str, spelling: str, method: str, value: object) -> DefinitionError:
    return definition_error(
        owner,
        f"{spelling} decorates {method}, a {type(value).__name__}; "
        "saga actions are plain methods (def or async def)",
    )


def _is_function_like(value: object) -> bool:
    return isinstance(value, FunctionType) or inner_function(value) is not None


def _check_name(fn: FunctionType, name: object) -> str | None:
    if name is None or (isinstance(name, str) and name.strip()):
        return name
    raise definition_error(
        _owner(fn),
        f"the action name of method {fn.__name__} must be a non-empty string, got {describe(name)}",
    )


def _check_policies(
    fn: FunctionType, kind: str, retry: object, timeout: object
) -> tuple[Retry | None, float | None]:
    """`retry` and `timeout` (None: not given), or the DefinitionError that says why not."""
    if retry is not None and (problem := retry_problem(retry)) is not None:
        raise definition_error(_owner(fn), f"the retry of {kind} {fn.__name__} {problem}")
    if timeout is not None and (problem := seconds_problem(timeout)) is not None:
        raise definition_error(_owner(fn), f"the timeout of {kind} {fn.__name__} {problem}")
    return cast("Retry | None", retry), cast("float | None", timeout)


def _mark(fn: FunctionType, marker: Marker) -> Any:
    previous: Marker | None = fn.__dict__.get(MARKER)
    if previous is not None:
        raise definition_error(
            _owner(fn),
            f"method {fn.__name__} is decorated twice, with {marker.spelling()} and "
            f"{previous.spelling()}; a method is one step, compensator or action",
        )
    setattr(fn, MARKER, marker)
    return fn


def _unordered(fn: FunctionType) -> DefinitionError:
    return definition_error(
        _owner(fn), f"method {fn.__name__} uses @step without an order; {_STEP_FIX}"
    )


@overload
def step(
    *,
    order: int,
    parallel: bool = False,
    retry: Retry | None = None,
    timeout: float | None = None,
) -> Callable[[_M], _M]: ...
@overload
def step(
    *,
    order: int,
    name: str,
    parallel: bool = False,
    retry: Retry | None = None,
    timeout: float | None = None,
) -> Callable[[_M], _M]: ...
def step(
    positional: object = _MISSING,
    /,
    *,
    order: object = _MISSING,
    name: object = None,
    parallel: object = False,
    retry: object = None,
    timeout: object = None,
) -> Any:
    """Mark a method as a step: `sequence()` is the steps sorted by `order`.

    `name=` sets the action name (default: the method name); `parallel=True` makes the
    step a member of a parallel group, all the steps of its order, which run together
    (every step of that order must say so); `retry=` (a `Retry`) runs it again when it
    fails, `timeout=` (seconds) bounds each attempt. Returns the method itself.
    """
    if _is_function_like(positional):  # bare @step
        raise _unordered(_function(positional, "@step"))
    # Shown as given in error messages, except the default.
    options = {"parallel": None if parallel is False else parallel, "retry": retry}
    policies = {**options, "timeout": timeout}

    def decorate(method: object) -> Any:
        fn = _function(method, spell("step", order=order, name=name, **policies))
        owner = _owner(fn)
        if positional is not _MISSING:
            given = positional if isinstance(positional, int) else 1
            used = spell("step", positional, name=name, **policies)
            fix = spell("step", order=given, name=name, **policies)
            raise definition_error(
                owner,
                f"method {fn.__name__} uses {used}; the order is keyword-only: write {fix}",
            )
        if order is _MISSING:
            raise _unordered(fn)
        if not isinstance(order, int) or isinstance(order, bool):
            raise definition_error(
                owner,
                f"the order of step {fn.__name__} must be an int, got {describe(order)}; "
                f"write e.g. {spell('step', order=1)}",
            )
        checked_name = _check_name(fn, name)
        if not isinstance(parallel, bool):
            raise definition_error(
                owner,
                f"the parallel= of step {fn.__name__} must be True or False, got "
                f"{describe(parallel)}",
            )
        checked_retry, checked_timeout = _check_policies(fn, "step", retry, timeout)
        marker = Marker(
            "step",
            checked_name,
            order=order,
            retry=checked_retry,
            timeout=checked_timeout,
            parallel=parallel,
        )
        return _mark(fn, marker)

    return decorate


@final
class BareCompensates:
    """What `compensates(fn)` returns: a bare `@compensates` leaves it in the class body
    (the metaclass reports it), `@compensates(other_method)` calls it."""

    __slots__ = ("function",)

    def __init__(self, function: object) -> None:
        self.function = function

    def __call__(self, method: object) -> NoReturn:
        fn = _function(method, "@compensates")
        given = inner_function(self.function) or self.function
        marker: Marker | None = getattr(given, MARKER, None)
        target = (marker and marker.name) or getattr(given, "__name__", "action_name")
        raise definition_error(
            _owner(fn),
            f"method {fn.__name__} uses @compensates({target}), a function; name the action "
            f"as a string: write {spell('compensates', target)}",
        )


@overload
def compensates(
    target: str, /, *, retry: Retry | None = None, timeout: float | None = None
) -> Callable[[_M], _M]: ...
@overload
def compensates(
    target: str, /, *, name: str, retry: Retry | None = None, timeout: float | None = None
) -> Callable[[_M], _M]: ...
def compensates(
    target: object = _MISSING,
    /,
    *,
    name: object = None,
    retry: object = None,
    timeout: object = None,
) -> Any:
    """Mark a method as the compensator of the action named `target` (a string).

    `name=` sets its own action name (default: the method name); `retry=` and `timeout=`
    as for `step`. Returns the method itself.
    """
    if _is_function_like(target):
        return BareCompensates(target)
    policies = {"retry": retry, "timeout": timeout}

    def decorate(method: object) -> Any:
        fn = _function(method, spell("compensates", name=name, **policies))
        if target is _MISSING:
            raise bare_compensates(_owner(fn), fn.__name__)
        if not isinstance(target, str) or not target.strip():
            raise definition_error(
                _owner(fn),
                f"the action that method {fn.__name__} compensates must be named by a "
                f"non-empty string, got {describe(target)}",
            )
        checked_name = _check_name(fn, name)
        checked_retry, checked_timeout = _check_policies(fn, "compensator", retry, timeout)
        marker = Marker(
            "compensator", checked_name, target=target, retry=checked_retry, timeout=checked_timeout
        )
        return _mark(fn, marker)

    return decorate


def bare_compensates(owner: str, method: str) -> DefinitionError:
    return definition_error(
        owner,
        f"method {method} uses @compensates without the action it undoes; "
        f"write {spell('compensates', 'action_name')}",
    )


@overload
def action(fn: _M, /) -> _M: ...
@overload
def action(*, name: str) -> Callable[[_M], _M]: ...
def action(positional: object = _MISSING, /, *, name: object = None) -> Any:
    """Mark a method as an action outside the sequence, run by `ctx.run(name)`.

    Used bare or as `@action(name=...)`. Returns the method itself.
    """

    def decorate(method: object) -> Any:
        fn = _function(method, spell("action", name=name))
        if positional is not _MISSING and not _is_function_like(positional):
            fix = spell("action", name=positional if isinstance(positional, str) else "...")
            raise definition_error(
                _owner(fn),
                f"method {fn.__name__} uses {spell('action', positional)}; "
                f"the name is keyword-only: write {fix}",
            )
        return _mark(fn, Marker("action", _check_name(fn, name)))

    return decorate(positional) if _is_function_like(positional) else decorate
