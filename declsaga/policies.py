"""Step policies: retries with backoff, timeouts and deadlines, and the clock they read.

    from declsaga.policies import Retry

    class PlaceOrder(Saga, deadline=60.0):
        @step(order=1, retry=Retry(attempts=5, backoff=0.2, on=(ConnectionError,)), timeout=5.0)
        def charge(self, ctx: Context) -> None: ...

`new()` takes the same as `retries={"charge": Retry(...)}`, `timeouts={"charge": 5.0}`
and `deadline=60.0`; `Executor(deadline=..., clock=...)` sets a deadline for every saga
it runs (a saga's own comes first) and the clock that backoff and deadlines read.
"""

from ._errors import DeadlineExceeded, SagaCancelled, StepTimeout
from ._policies import DEFAULT_COMPENSATOR_RETRY, Clock, Retry, SystemClock

__all__ = [
    "DEFAULT_COMPENSATOR_RETRY",
    "Clock",
    "DeadlineExceeded",
    "Retry",
    "SagaCancelled",
    "StepTimeout",
    "SystemClock",
]
