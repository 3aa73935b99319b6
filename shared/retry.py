"""One retry/backoff helper for every loop that waits out a failing dependency.

`Backoff` is the arithmetic (first wait, growth, cap, optional jitter); `Retry` is one loop's bookkeeping
(failures so far, and when to give up: after `attempts` retries, after `patience` seconds since the loop
began, or before a wait would end past an absolute `deadline`). `retry`/`aretry` run one call until it
succeeds or the loop gives up (then the last error is raised); `keep_running` runs a worker's step until a
stop is requested, backing off after each failure.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
ErrorTypes = type[BaseException] | tuple[type[BaseException], ...]
OnRetry = Callable[[BaseException, float], None]
"""Called with the error and the seconds about to be waited, inside the `except` block (so `log.exception` works)."""


@dataclass(frozen=True)
class Backoff:
    """Waits `first`, `first*factor`, ... capped at `cap`; with `jitter` each wait is scaled by U[0.5, 1)."""

    first: float
    cap: float = math.inf
    factor: float = 2.0
    jitter: bool = False

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1-based)."""
        delay = min(self.cap, self.first * self.factor ** max(0, failures - 1))
        return delay * (0.5 + random.random() / 2) if self.jitter else delay


class Retry:
    """The state of one retry loop. `failed()` counts a failure and says how long to wait, or None to give up."""

    def __init__(
        self,
        backoff: Backoff,
        *,
        attempts: int | None = None,
        patience: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.backoff, self.attempts, self.patience, self.deadline = backoff, attempts, patience, deadline
        self.failures = 0
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def failed(self, at_least: float = 0.0) -> float | None:
        """Count a failure; the seconds to wait (never under `at_least`), or None when out of attempts or time."""
        self.failures += 1
        if self.attempts is not None and self.failures > self.attempts:
            return None
        if self.patience is not None and self.elapsed > self.patience:
            return None
        delay = max(self.backoff.delay(self.failures), at_least)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay

    def succeeded(self) -> None:
        """Progress was made: the next failure waits the first delay again."""
        self.failures = 0


def _is(retry_on: ErrorTypes | Callable[[BaseException], bool], error: BaseException) -> bool:
    if isinstance(retry_on, type | tuple):
        return isinstance(error, retry_on)
    return retry_on(error)


def _pause(
    error: BaseException,
    loop: Retry,
    retry_on: ErrorTypes | Callable[[BaseException], bool],
    on_retry: OnRetry | None,
    at_least: Callable[[BaseException], float] | None,
    give_up: Callable[[], bool] | None,
) -> float | None:
    """The wait before the next attempt after `error`, or None when it must be raised."""
    if not _is(retry_on, error) or (give_up is not None and give_up()):
        return None
    delay = loop.failed(at_least(error) if at_least else 0.0)
    if delay is not None and on_retry is not None:
        on_retry(error, delay)
    return delay


def retry(
    call: Callable[[], T],
    loop: Retry,
    *,
    retry_on: ErrorTypes | Callable[[BaseException], bool],
    on_retry: OnRetry | None = None,
    at_least: Callable[[BaseException], float] | None = None,
    give_up: Callable[[], bool] | None = None,
    stop: threading.Event | None = None,
) -> T:
    """`call()` until it succeeds; errors matching `retry_on` are waited out per `loop`, others raise at once.

    Gives up (raising the last error) when `loop` says so, when `give_up()` is true at a failure, or when
    `stop` is set before or during a wait (waits are then `stop.wait`, so a stop cuts them short).
    """
    while True:
        try:
            return call()
        except BaseException as error:
            delay = _pause(error, loop, retry_on, on_retry, at_least, give_up)
            if delay is None or (stop.wait(delay) if stop is not None else time.sleep(delay)):
                raise


async def aretry(
    call: Callable[[], Awaitable[T]],
    loop: Retry,
    *,
    retry_on: ErrorTypes | Callable[[BaseException], bool],
    on_retry: OnRetry | None = None,
    at_least: Callable[[BaseException], float] | None = None,
) -> T:
    """The asyncio form of `retry` (waits with `asyncio.sleep`)."""
    while True:
        try:
            return await call()
        except BaseException as error:
            delay = _pause(error, loop, retry_on, on_retry, at_least, None)
            if delay is None:
                raise
        await asyncio.sleep(delay)


def keep_running(
    step: Callable[[], object],
    stop: threading.Event,
    loop: Retry,
    *,
    retry_on: ErrorTypes = Exception,
    on_failure: OnRetry | None = None,
) -> None:
    """Run `step()` until `stop` is set; a failure matching `retry_on` backs off per `loop` (which never gives
    up unless it was made with limits, then the error is raised); a step that returns resets the backoff."""
    while not stop.is_set():
        try:
            step()
            loop.succeeded()
        except retry_on as error:
            delay = loop.failed()
            if delay is None:
                raise
            if on_failure is not None:
                on_failure(error, delay)
            stop.wait(delay)
