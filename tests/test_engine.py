"""The engine alone: a pure function of a journal and a setup, driven by hand."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

import pytest

import declsaga
from declsaga import ActionNotFound, CompensationFailed
from declsaga._engine import Compensate, Engine, Finish, RunStep, StartRollback
from declsaga._journal import (
    Role,
    RollbackStarted,
    RunFailed,
    RunStarted,
    RunSucceeded,
    SagaEnded,
    SagaStarted,
    Status,
)


def noop(ctx: declsaga.Context) -> None:
    return None


SETUP = declsaga.new(
    {"foo": noop, "bar": noop, "baz": noop, "nested": noop, "undo-foo": noop, "undo-n": noop},
    sequence=["foo", "bar", "baz"],
    compensators={"foo": "undo-foo", "nested": "undo-n"},
)


def started(run: int, action: str, role: Role = Role.STEP, **kw: int) -> RunStarted:
    return RunStarted(run, action, role, kw.get("parent"), kw.get("index"), kw.get("target"), 0.0)


def test_engine_module_does_no_io_no_asyncio_no_clock() -> None:
    source = (Path(declsaga.__file__).parent / "_engine.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0] if node.module and not node.level else "")
    assert imported <= {"__future__", "typing", ""}, imported


def test_a_fresh_journal_runs_the_first_step() -> None:
    engine = Engine(SETUP)
    engine.apply(SagaStarted("s", datetime.now(UTC), 0.0))
    decision = engine.next()
    assert type(decision) is RunStep
    assert decision.action.name == "foo"
    assert decision.run is None
    assert engine.next() == decision  # asking twice changes nothing


def test_steps_follow_the_sequence_then_finish() -> None:
    engine = Engine(SETUP)
    names = []
    for run in range(3):
        decision = engine.next()
        assert isinstance(decision, RunStep)
        names.append(decision.action.name)
        engine.apply(started(run, decision.action.name))
        engine.apply(RunSucceeded(run, None, 0.0))
    assert names == ["foo", "bar", "baz"]
    assert engine.next() == Finish(Status.COMPLETED, None)
    before = engine.status
    engine.apply(SagaEnded(Status.COMPLETED, None, 0.0))
    assert (before, engine.status) == (Status.RUNNING, Status.COMPLETED)


def test_a_started_step_without_outcome_is_run_again() -> None:
    # What recovery sees after a crash in the middle of a step.
    engine = Engine(SETUP)
    engine.apply(started(0, "foo"))
    decision = engine.next()
    assert isinstance(decision, RunStep)
    assert (decision.action.name, decision.run) == ("foo", 0)


def test_failure_rolls_back_newest_first_including_nested_runs() -> None:
    engine = Engine(SETUP)
    error = RuntimeError("bar failed")
    engine.apply(started(0, "foo"))
    engine.apply(RunSucceeded(0, None, 0.0))
    engine.apply(started(1, "bar"))
    engine.apply(started(2, "nested", Role.CALL, parent=1, index=0))
    engine.apply(RunSucceeded(2, None, 0.0))
    engine.apply(RunFailed(1, error, 0.0))
    assert engine.next() == StartRollback(error)
    engine.apply(RollbackStarted(error))
    assert engine.status is Status.COMPENSATING

    first = engine.next()
    assert isinstance(first, Compensate)
    assert (first.action.name, first.target, first.target_action) == ("undo-n", 2, "nested")
    engine.apply(started(3, "undo-n", Role.COMPENSATION, target=2))
    engine.apply(RunSucceeded(3, None, 0.0))

    second = engine.next()
    assert isinstance(second, Compensate)
    assert (second.action.name, second.target) == ("undo-foo", 0)
    engine.apply(started(4, "undo-foo", Role.COMPENSATION, target=0))
    engine.apply(RunSucceeded(4, None, 0.0))
    assert engine.next() == Finish(Status.COMPENSATED, error)


def test_a_compensation_in_flight_is_run_again_and_done_ones_are_not() -> None:
    engine = Engine(SETUP)
    error = RuntimeError("x")
    engine.apply(started(0, "foo"))
    engine.apply(RunSucceeded(0, None, 0.0))
    engine.apply(started(1, "bar"))
    engine.apply(RunFailed(1, error, 0.0))
    engine.apply(RollbackStarted(error))
    engine.apply(started(2, "undo-foo", Role.COMPENSATION, target=0))
    decision = engine.next()
    assert isinstance(decision, Compensate)
    assert (decision.action.name, decision.run) == ("undo-foo", 2)


def test_a_failed_compensation_ends_the_saga_failed() -> None:
    engine = Engine(SETUP)
    error, undo_error = RuntimeError("bar"), ValueError("undo")
    engine.apply(started(0, "foo"))
    engine.apply(RunSucceeded(0, None, 0.0))
    engine.apply(started(1, "bar"))
    engine.apply(RunFailed(1, error, 0.0))
    engine.apply(RollbackStarted(error))
    engine.apply(started(2, "undo-foo", Role.COMPENSATION, target=0))
    engine.apply(RunFailed(2, undo_error, 0.0))
    decision = engine.next()
    assert isinstance(decision, Finish)
    assert decision.status is Status.FAILED
    assert isinstance(decision.error, CompensationFailed)
    assert (decision.error.action_error, decision.error.error) == (error, undo_error)


def test_an_unresolved_step_starts_the_rollback_without_a_run() -> None:
    setup = declsaga.new({"foo": noop}, sequence=["foo", "ghost"])
    engine = Engine(setup)
    engine.apply(started(0, "foo"))
    engine.apply(RunSucceeded(0, None, 0.0))
    decision = engine.next()
    assert isinstance(decision, StartRollback)
    assert isinstance(decision.error, ActionNotFound)
    assert str(decision.error) == "No action named 'ghost' (in the sequence)."


def test_unknown_records_are_refused() -> None:
    with pytest.raises(TypeError, match=r"^Unknown journal record"):
        Engine(SETUP).apply(("not", "a", "record"))  # type: ignore[arg-type]
