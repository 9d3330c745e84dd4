"""Durable homes for saga journals: the `Store` contract and the stores that keep it.

`MemoryStore` is the reference implementation (one process, nothing survives it);
`SQLiteStore` keeps sagas in one file shared by the processes of one host. Every store
passes the behavioural suite in `declsaga.testing.StoreConformance`.
"""

from ._base import FINAL_STATUSES as FINAL_STATUSES
from ._base import STATUSES as STATUSES
from ._base import Claim as Claim
from ._base import Commit as Commit
from ._base import SagaHeader as SagaHeader
from ._base import Store as Store
from ._base import StoredSaga as StoredSaga
from ._sqlite import SQLiteStore as SQLiteStore
from ._urls import from_url as from_url
from .memory import MemoryStore as MemoryStore

__all__ = [
    "FINAL_STATUSES",
    "STATUSES",
    "Claim",
    "Commit",
    "MemoryStore",
    "SQLiteStore",
    "SagaHeader",
    "Store",
    "StoredSaga",
    "from_url",
]
