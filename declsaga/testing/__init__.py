"""The public test kit: the behavioural suite that every store passes,
`CrashingStore`, which kills its process at a chosen commit for crash-recovery tests,
and `FakeClock`, virtual time for tests of retry schedules and deadlines.

Subclass `StoreConformance` in a test module and give it a `store` fixture; every test
of the contract then runs against your store::

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path: Path) -> Iterator[Store]:
            with MyStore(tmp_path / "sagas") as store:
                yield store

A store whose objects share their data (a file, a server) subclasses
`SharedStoreConformance` instead, and also gives a `second_store` fixture that opens
another object on the same data.

This package imports pytest, a test dependency: import it from tests only. Importing
`declsaga` itself never imports it.
"""

from ._clock import FakeClock
from ._conformance import SharedStoreConformance, StoreConformance
from ._crashing import CrashingStore

__all__ = ["CrashingStore", "FakeClock", "SharedStoreConformance", "StoreConformance"]
