"""SPEC §7: the error hierarchy, messages as sentences, and pickle round trips."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

import declsaga
from declsaga import (
    ActionNotFound,
    AggregateNotFound,
    CompensationFailed,
    CompensationTimeout,
    DefinitionError,
    EmptyActionName,
    EncodeError,
    HandlerNotFound,
    InvalidSetup,
    MissingBus,
    MissingRepository,
    RecordedError,
    SagaBusy,
    SagaError,
    StoreError,
    UsageError,
)

HIERARCHY: list[tuple[type[BaseException], tuple[type[BaseException], ...]]] = [
    (InvalidSetup, (SagaError, ValueError)),
    (EmptyActionName, (InvalidSetup,)),
    (ActionNotFound, (InvalidSetup, LookupError)),
    (DefinitionError, (InvalidSetup, TypeError)),
    (CompensationFailed, (SagaError,)),
    (CompensationTimeout, (SagaError, TimeoutError)),
    (MissingBus, (SagaError,)),
    (MissingRepository, (SagaError,)),
    (HandlerNotFound, (SagaError, LookupError)),
    (AggregateNotFound, (SagaError, LookupError)),
    (UsageError, (SagaError, TypeError)),
    (StoreError, (SagaError,)),
    (SagaBusy, (SagaError,)),
    (RecordedError, (SagaError,)),
    (EncodeError, (SagaError, TypeError)),
    (SagaError, (Exception,)),
]


@pytest.mark.parametrize(("error", "bases"), HIERARCHY)
def test_hierarchy(error: type[BaseException], bases: tuple[type[BaseException], ...]) -> None:
    for base in bases:
        assert issubclass(error, base)


class Boom(Exception):
    pass


def examples() -> list[SagaError]:
    action_error = Boom("card declined")
    compensation_error = RuntimeError("refund failed")
    return [
        EmptyActionName(" ", position=2),
        ActionNotFound("fix-foo", role="the compensator of 'foo'"),
        DefinitionError("Saga class 'X': method 'y' is wrong."),
        CompensationFailed(action_error, compensation_error),
        CompensationTimeout("charge", "refund", 1.5),
        MissingBus("event", "notify"),
        MissingRepository("load"),
        HandlerNotFound("ship"),
        AggregateNotFound("Order", "o-1"),
        UsageError("bad"),
        StoreError("The store failed."),
        SagaBusy("order-1"),
        RecordedError("shop.Declined", "card 4242 declined"),
        EncodeError("field items[2]", "reserve", "builtins.set", "sets are not stored"),
        EncodeError("field when", None, "builtins.object"),
    ]


MESSAGES = [
    "The action name at position 2 of the sequence is empty: ' '.",
    "No action named 'fix-foo' (the compensator of 'foo').",
    "Saga class 'X': method 'y' is wrong.",
    "The rollback after Boom(card declined) failed with RuntimeError(refund failed).",
    "The rollback ran out of its 1.5s budget while compensating action 'charge' with 'refund'.",
    "Action 'notify' used the event bus, but the executor has none: pass event_bus= to Executor.",
    "Action 'load' fetched an aggregate, but the executor has no repository: "
    "pass repository= to Executor.",
    "No handler is registered for command 'ship'.",
    "No Order aggregate with id 'o-1' is stored.",
    "bad",
    "The store failed.",
    "Saga 'order-1' is being driven by another live process or thread.",
    "shop.Declined: card 4242 declined",
    "Action 'reserve' left field items[2] holding a builtins.set, which the journal cannot "
    "store (sets are not stored). It stores str, int, float, bool, None, list, tuple, dict, "
    "datetime, date, UUID, Decimal, Enum and attrs instances.",
    "The saga's initial field when holds a builtins.object, which the journal cannot store. "
    "It stores str, int, float, bool, None, list, tuple, dict, datetime, date, UUID, Decimal, "
    "Enum and attrs instances.",
]


@pytest.mark.parametrize(("error", "message"), list(zip(examples(), MESSAGES, strict=True)))
def test_messages_are_sentences(error: SagaError, message: str) -> None:
    assert str(error) == message


@pytest.mark.parametrize("error", examples(), ids=lambda e: type(e).__name__)
def test_errors_survive_pickle_with_their_fields(error: SagaError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert sorted(vars(copy)) == sorted(vars(error))
    for key, value in vars(error).items():
        if isinstance(value, BaseException):
            assert type(vars(copy)[key]) is type(value)
            assert str(vars(copy)[key]) == str(value)
        else:
            assert vars(copy)[key] == value


def test_compensation_failed_keeps_both_errors_and_its_cause() -> None:
    error = CompensationFailed(Boom("declined"), RuntimeError("refund failed"))
    assert error.__cause__ is error.error
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy.action_error, Boom)
    assert str(copy.action_error) == "declined"
    assert isinstance(copy.error, RuntimeError)
    assert copy.__cause__ is copy.error


def test_compensation_timeout_is_a_timeout_error_that_pickles_like_one() -> None:
    error = CompensationTimeout("charge", "refund", 2)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.action, copy.compensator, copy.timeout) == ("charge", "refund", 2)
    assert copy.errno is None  # not mistaken for an OSError(errno, strerror)
    assert isinstance(copy, TimeoutError)


def test_an_unpicklable_inner_error_is_replaced_by_a_saga_error() -> None:
    class Local(Exception):  # local classes cannot be pickled
        pass

    error = CompensationFailed(Local("nope"), asyncio.CancelledError())
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy.action_error) is SagaError
    assert str(copy.action_error) == f"{__name__}.{Local.__qualname__}: nope"
    assert isinstance(copy.error, asyncio.CancelledError)


def test_an_unpicklable_field_value_in_a_cause_is_replaced() -> None:
    class Holder(Exception):
        def __init__(self) -> None:
            super().__init__("holds a lock")
            self.lock = threading.Lock()

    error = SagaError("outer")
    error.__cause__ = Holder()
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy.__cause__) is SagaError
    assert str(copy.__cause__).endswith("Holder: holds a lock")


def test_cause_survives_pickle() -> None:
    error = UsageError("outer")
    error.__cause__ = KeyError("inner")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy.__cause__, KeyError)
    assert copy.__cause__.args == ("inner",)


def test_every_public_error_is_exported() -> None:
    exported = {
        name
        for name in declsaga.__all__
        if isinstance(getattr(declsaga, name), type)
        and issubclass(getattr(declsaga, name), BaseException)
    }
    assert exported == {error.__name__ for error, _ in HIERARCHY}
