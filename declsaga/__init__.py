"""declsaga: declarative SAGAs with goes' exact rollback semantics.

Everything public is re-exported here; the modules behind it are private. Public
submodules: `declsaga.stores` (the store contract, stores, `from_url`), `declsaga.worker`
(`Worker`), `declsaga.inspection` and `declsaga.testing`.
"""

import typing as _typing

from ._components import AggregateRepository as AggregateRepository
from ._components import Command as Command
from ._components import CommandBus as CommandBus
from ._components import Event as Event
from ._components import EventBus as EventBus
from ._components import InMemoryCommandBus as InMemoryCommandBus
from ._components import InMemoryEventBus as InMemoryEventBus
from ._components import InMemoryRepository as InMemoryRepository
from ._context import Context as Context
from ._dsl import Saga as Saga
from ._dsl import action as action
from ._dsl import compensates as compensates
from ._dsl import step as step
from ._errors import ActionNotFound as ActionNotFound
from ._errors import AggregateNotFound as AggregateNotFound
from ._errors import CompensationFailed as CompensationFailed
from ._errors import CompensationTimeout as CompensationTimeout
from ._errors import DefinitionError as DefinitionError
from ._errors import EmptyActionName as EmptyActionName
from ._errors import EncodeError as EncodeError
from ._errors import HandlerNotFound as HandlerNotFound
from ._errors import InvalidSetup as InvalidSetup
from ._errors import MissingBus as MissingBus
from ._errors import MissingRepository as MissingRepository
from ._errors import RecordedError as RecordedError
from ._errors import SagaBusy as SagaBusy
from ._errors import SagaError as SagaError
from ._errors import StoreError as StoreError
from ._errors import UsageError as UsageError
from ._executor import DEFAULT_COMPENSATE_TIMEOUT as DEFAULT_COMPENSATE_TIMEOUT
from ._executor import Executor as Executor
from ._executor import execute as execute
from ._report import ActionRun as ActionRun
from ._report import Recovered as Recovered
from ._report import Report as Report
from ._setup import Action as Action
from ._setup import Setup as Setup
from ._setup import new as new
from ._setup import validate as validate
from .stores import SQLiteStore as SQLiteStore

if _typing.TYPE_CHECKING:
    from .stores._postgres import PostgresStore as PostgresStore

__all__ = [
    "DEFAULT_COMPENSATE_TIMEOUT",
    "Action",
    "ActionNotFound",
    "ActionRun",
    "AggregateNotFound",
    "AggregateRepository",
    "Command",
    "CommandBus",
    "CompensationFailed",
    "CompensationTimeout",
    "Context",
    "DefinitionError",
    "EmptyActionName",
    "EncodeError",
    "Event",
    "EventBus",
    "Executor",
    "HandlerNotFound",
    "InMemoryCommandBus",
    "InMemoryEventBus",
    "InMemoryRepository",
    "InvalidSetup",
    "MissingBus",
    "MissingRepository",
    "PostgresStore",
    "RecordedError",
    "Recovered",
    "Report",
    "SQLiteStore",
    "Saga",
    "SagaBusy",
    "SagaError",
    "Setup",
    "StoreError",
    "UsageError",
    "action",
    "compensates",
    "execute",
    "new",
    "step",
    "validate",
]


def __getattr__(name: str) -> object:
    # PostgresStore's module is imported on first use: it is the one public name whose
    # store needs an optional extra (psycopg), which the class itself imports lazily.
    if name == "PostgresStore":
        from .stores._postgres import PostgresStore  # noqa: PLC0415

        globals()[name] = PostgresStore
        return PostgresStore
    raise AttributeError(f"module 'declsaga' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "PostgresStore"})
