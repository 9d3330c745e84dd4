"""SPEC §1: `__all__` is exactly the public surface, and nothing private leaks."""

from __future__ import annotations

import declsaga

# The table of SPEC §1, as of the core issue (durable names land with their issues).
SPEC_SECTION_1 = {
    "Saga", "step", "compensates", "action",
    "Setup", "Action", "new", "validate",
    "Executor", "execute", "Context",
    "Report", "ActionRun", "DEFAULT_COMPENSATE_TIMEOUT",
    "SagaError", "InvalidSetup", "EmptyActionName", "ActionNotFound", "DefinitionError",
    "CompensationFailed", "CompensationTimeout", "MissingBus", "MissingRepository",
    "HandlerNotFound", "AggregateNotFound", "UsageError",
    "Event", "Command",
    "EventBus", "CommandBus", "AggregateRepository",
    "InMemoryEventBus", "InMemoryCommandBus", "InMemoryRepository",
    # Durable execution (SPEC §8).
    "SQLiteStore", "PostgresStore", "Recovered",
    "StoreError", "SagaBusy", "RecordedError", "EncodeError",
}  # fmt: skip


def test_all_is_exactly_the_contract() -> None:
    assert set(declsaga.__all__) == SPEC_SECTION_1
    assert len(declsaga.__all__) == len(SPEC_SECTION_1)


def test_all_is_sorted_constants_then_classes_then_functions() -> None:
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert declsaga.__all__ == sorted(declsaga.__all__, key=kind)


def test_every_name_resolves() -> None:
    for name in declsaga.__all__:
        assert getattr(declsaga, name) is not None


def test_nothing_public_beyond_all() -> None:
    public = {
        name
        for name in vars(declsaga)
        if not name.startswith("_")
        and name not in {"inspection", "testing", "stores", "worker", "policies"}
    }
    assert public == set(declsaga.__all__)


def test_default_compensate_timeout() -> None:
    assert declsaga.DEFAULT_COMPENSATE_TIMEOUT == 10.0
