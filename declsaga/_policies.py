"""Step policies: retries with backoff, timeouts, deadlines, and the clock they read.

A policy never validates itself when built: the DSL and `new()` check it where it is
attached, so that a mistake is reported with the class, the method and the value (see
`retry_problem` and `seconds_problem`).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol, runtime_checkable

import attrs

__all__ = [
    "DEFAULT_COMPENSATOR_RETRY",
    "ActionPolicy",
    "Clock",
    "Retry",
    "SystemClock",
    "retry_problem",
    "seconds_problem",
]


@attrs.frozen
class Retry:
    """Run an action again when it raises one of `on`, up to `attempts` times in all.

    Before attempt n + 1 the executor waits `backoff * multiplier ** (n - 1)` seconds,
    at most `max_delay`, spread by up to `jitter` of itself either way (0.1: +-10%), so
    that sagas failing together do not retry together.
    """

    attempts: int = 3
    backoff: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.1
    on: tuple[type[BaseException], ...] = (Exception,)

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt number `attempt`, which raised `error`, is followed by another."""
        return attempt < self.attempts and isinstance(error, self.on)

    def delay(self, attempt: int, fraction: float) -> float:
        """Seconds to wait after failed attempt `attempt`; `fraction` is uniform in [0, 1)."""
        base = min(self.max_delay, self.backoff * self.multiplier ** (attempt - 1))
        return min(self.max_delay, max(0.0, base * (1 + self.jitter * (2 * fraction - 1))))


# A compensation must eventually succeed, but goes' rule stands that a compensator which
# fails for good fails the rollback. By default compensators retry what is usually
# transient (timeouts and lost connections: OSError's TimeoutError and ConnectionError),
# five attempts in all, within the rollback's time budget.
DEFAULT_COMPENSATOR_RETRY = Retry(
    attempts=5, backoff=0.1, max_delay=2.0, on=(TimeoutError, ConnectionError)
)


@attrs.frozen
class ActionPolicy:
    """The policies attached to one action."""

    retry: Retry | None = None
    timeout: float | None = None  # seconds


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def seconds_problem(value: object) -> str | None:
    """Why `value` is not a duration in seconds (a number above 0, finite), or None."""
    if _positive(value):
        return None
    return f"must be a number of seconds above 0, got {value!r}"


def retry_problem(retry: object) -> str | None:
    """Why `retry` is not a usable `Retry`, or None."""
    if not isinstance(retry, Retry):
        return f"must be a Retry, got {retry!r}"
    attempts = retry.attempts
    if type(attempts) is not int or attempts < 1:
        return f"needs attempts of at least 1, got attempts={attempts!r}"
    backoff = retry.backoff
    if not (_positive(backoff) or (type(backoff) in (int, float) and backoff == 0)):
        return f"needs a backoff of 0 seconds or more, finite, got backoff={backoff!r}"
    if not _positive(retry.max_delay):
        return f"needs a max_delay above 0 seconds, finite, got max_delay={retry.max_delay!r}"
    multiplier = retry.multiplier
    if not _positive(multiplier) or multiplier < 1:
        return f"needs a multiplier of at least 1, got multiplier={multiplier!r}"
    jitter = retry.jitter
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter <= 1:
        return f"needs a jitter from 0 to 1, got jitter={jitter!r}"
    on = retry.on
    if not isinstance(on, tuple) or not on:
        return f"needs on= as a non-empty tuple of exception types, got on={on!r}"
    kinds: tuple[object, ...] = on  # annotated as types; callers may pass anything
    for kind in kinds:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            return f"needs on= to hold exception types only, got {kind!r}"
    return None


@runtime_checkable
class Clock(Protocol):
    """What backoff and deadlines read and wait on; `SystemClock` by default, a fake one
    (`declsaga.testing.FakeClock`) in tests that must not sleep."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    async def sleep_async(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.sleep` and `asyncio.sleep`."""

    def __repr__(self) -> str:
        return "SystemClock()"

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def sleep_async(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
