"""Reading stored sagas from any process: `store.get(saga_id)` and `store.list(status)`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

from ._codec import Undecodable, decode
from ._durable import Frame, replay
from ._engine import Finish
from ._errors import StoreError
from ._journal import SagaEnded
from ._report import Report, build_report
from .stores._base import JSON, StoredSaga

__all__ = ["SagaRecord", "record_of"]


@attrs.frozen(eq=False)
class SagaRecord:
    """One stored saga, decoded: what it is, where it stands, what it did."""

    saga_id: str
    name: str  # the registered name of its definition
    status: str  # pending, running, compensating, completed, compensated or failed
    fingerprint: str
    definition: JSON  # the sequence, compensators and action names it was started with
    fields: dict[str, Any] | None  # the latest recorded fields (None: a setup without fields)
    # The runs recorded so far; `error` is set once the saga has ended. None while it is
    # pending: a submitted saga that has not started has no report yet.
    report: Report | None
    created: datetime
    updated: datetime
    journal: tuple[JSON, ...]  # the raw journal entries, for display and debugging

    @property
    def finished(self) -> bool:
        return self.status in {"completed", "compensated", "failed"}


def record_of(stored: StoredSaga) -> SagaRecord:
    """Decode a stored saga; `StoreError` if its journal cannot be read here."""
    # Imported here: the executor imports the stores, whose reading methods import this.
    from ._executor import outcome_error  # noqa: PLC0415

    frame = Frame()
    recorded = replay(stored, frame)
    last = recorded.records[-1] if recorded.records else None
    if type(last) is SagaEnded:
        error = outcome_error(Finish(last.status, last.error), None)
        end_at = last.at
    else:
        error, end_at = None, frame.to_perf(stored.updated)
    fields = None
    if recorded.fields is not None:
        try:
            fields = {name: decode(value) for name, value in recorded.fields.items()}
        except Undecodable as failure:
            raise StoreError(
                f"The fields of saga {stored.header.saga_id!r} cannot be decoded here: {failure}."
            ) from failure
    return SagaRecord(
        saga_id=stored.header.saga_id,
        name=stored.header.name,
        status=stored.status,
        fingerprint=stored.header.fingerprint,
        definition=stored.header.definition,
        fields=fields,
        report=build_report(recorded.records, error, end_at) if recorded.records else None,
        created=datetime.fromtimestamp(stored.created, UTC),
        updated=datetime.fromtimestamp(stored.updated, UTC),
        journal=stored.entries,
    )
