"""Opening a saga in a store: start it, resume it, or answer with its recorded outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ._codec import Undecodable, Unencodable, apply_fields, encode_fields, instance_from_fields
from ._dsl import Saga
from ._durable import DurableLog, Frame, Identity, Replay, identify, replay
from ._engine import Finish
from ._errors import EncodeError, StoreError, UsageError
from ._execution import Execution
from ._journal import SagaEnded, Status
from ._registry import lookup
from ._setup import FunctionalSetup, Setup
from .stores._base import (
    FINAL_STATUSES,
    JSON,
    PENDING,
    Claim,
    Commit,
    SagaHeader,
    Store,
    StoredSaga,
)

__all__ = ["Ended", "check_submitted", "ended", "open_saga", "resolve", "submit_saga"]

Build = Callable[[Setup, DurableLog, Replay | None], Execution]


@attrs.frozen
class Ended:
    """A saga that ended before: its journal, and how it ended."""

    replay: Replay
    decision: Finish


def open_saga(
    store: Store,
    claim: Claim,
    setup: Setup,
    identity: Identity,
    build: Build,
    *,
    stored: StoredSaga | None = None,
    fresh: bool = False,
) -> Execution | Ended:
    """Start the claimed saga, resume it from its journal, or return how it ended.

    `stored`: the saga as loaded after claiming, if the caller has it already.
    `fresh`: the saga id was just generated (a uuid4), so the store cannot hold it yet:
    nothing is loaded, and nothing here does I/O.
    """
    saga_id = claim.saga_id
    if stored is None and not fresh:
        stored = store.load(saga_id)  # after claiming: nobody else can change it now
    if stored is not None:
        _check_same(stored, identity, setup)
    if stored is None or stored.status == PENDING:
        # Never started: it starts now, from its initial fields (submitted ones, if any).
        header = _header(saga_id, setup, identity) if stored is None else stored.header
        log = DurableLog(
            store,
            claim,
            setup,
            header,
            seq=0 if stored is None else stored.seq,
            fields=header.fields,
            status=None,
            frame=Frame(),
        )
        return build(setup, log, None)
    frame = Frame()
    recorded = replay(stored, frame)
    if isinstance(setup, Saga):
        try:
            apply_fields(setup, recorded.fields)
        except Undecodable as error:  # like an entry that cannot be read: StoreError
            raise StoreError(
                f"The fields of saga {saga_id!r} cannot be decoded here: {error}."
            ) from error
    if stored.status in FINAL_STATUSES:
        return _ended(recorded)
    log = DurableLog(
        store,
        claim,
        setup,
        stored.header,
        seq=stored.seq,
        fields=recorded.fields,
        status=Status(stored.status),
        frame=frame,
    )
    return build(setup, log, recorded)


def submit_saga(
    store: Store, claim: Claim, setup: Setup, identity: Identity, *, fresh: bool
) -> None:
    """Record the claimed saga as pending, unless it is recorded already (then it must
    have been recorded with the same definition and initial fields)."""
    stored = None if fresh else store.load(claim.saga_id)
    if stored is not None:
        _check_same(stored, identity, setup)
        return
    store.append(claim, Commit(0, (), PENDING, _header(claim.saga_id, setup, identity)))


def check_submitted(store: Store, saga_id: str, setup: Setup, identity: Identity) -> None:
    """For a saga id that someone else holds: if it is recorded, it must have been
    recorded with the same definition and initial fields."""
    stored = store.load(saga_id)
    if stored is not None:
        _check_same(stored, identity, setup)


def ended(stored: StoredSaga) -> Ended:
    """How a stored saga that reached a final status ended."""
    return _ended(replay(stored, Frame()))


def _ended(recorded: Replay) -> Ended:
    last = recorded.records[-1]
    assert type(last) is SagaEnded, last
    return Ended(recorded, Finish(last.status, last.error))


def resolve(stored: StoredSaga) -> tuple[Setup, Identity] | str:
    """The setup to resume a stored saga with, or why it must be left untouched."""
    header = stored.header
    definition = lookup(header.name)
    if definition is None:
        return (
            f"Saga {header.saga_id!r} was started by the definition {header.name!r}, which "
            "is not registered in this process: import the module that defines it before "
            "calling recover(). It is left untouched."
        )
    setup: Setup
    if isinstance(definition, type) and issubclass(definition, Saga):
        try:
            setup = instance_from_fields(definition, header.fields)
        except Undecodable as error:
            return f"Saga {header.saga_id!r} cannot be rebuilt: {error}. It is left untouched."
    else:
        assert isinstance(definition, FunctionalSetup)
        setup = definition
    identity = identify(setup)
    if identity.definition.fingerprint != header.fingerprint:
        changes = identity.definition.differences(header.definition)
        return (
            f"Saga {header.saga_id!r} was started by {header.name!r} with fingerprint "
            f"{header.fingerprint}; that definition now has fingerprint "
            f"{identity.definition.fingerprint} ({changes}). It is left untouched."
        )
    return setup, identity


def _header(saga_id: str, setup: Setup, identity: Identity) -> SagaHeader:
    return SagaHeader(
        saga_id,
        identity.name,
        identity.definition.fingerprint,
        identity.definition.as_json(),
        _initial_fields(setup),
    )


def _initial_fields(setup: Setup) -> JSON:
    if not isinstance(setup, Saga):
        return None
    try:
        return encode_fields(setup)
    except Unencodable as error:
        raise EncodeError(f"field {error.path}", None, error.type_name, error.reason) from None


def _check_same(stored: StoredSaga, identity: Identity, setup: Setup) -> None:
    """A stored id may only be started again with the same definition and initial fields."""
    header = stored.header
    differences = []
    if header.name != identity.name:
        differences.append(f"the definition {identity.name!r} (recorded: {header.name!r})")
    elif header.fingerprint != identity.definition.fingerprint:
        changes = identity.definition.differences(header.definition)
        differences.append(
            f"a definition with fingerprint {identity.definition.fingerprint} (recorded: "
            f"{header.fingerprint}; {changes})"
        )
    elif isinstance(setup, Saga):
        given: dict[str, Any] = _initial_fields(setup)
        recorded = _with_added_defaults(type(setup), header.fields or {})
        changed = sorted(
            key for key in given.keys() | recorded.keys() if given.get(key) != recorded.get(key)
        )
        if changed:
            differences.append(f"other initial values for {', '.join(changed)}")
    if differences:
        raise UsageError(
            f"Saga id {header.saga_id!r} is recorded with other settings: this call gives "
            f"{'; '.join(differences)}."
        )


def _with_added_defaults(cls: type[Saga], fields: dict[str, Any]) -> dict[str, Any]:
    """The recorded initial fields, plus the defaults of fields added since (SPEC: "a
    field added since the saga started takes its default"), encoded."""
    try:
        return encode_fields(instance_from_fields(cls, fields))
    except (Undecodable, Unencodable):  # e.g. a field removed since: compare as recorded
        return fields
