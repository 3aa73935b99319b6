"""The retry helper: backoff arithmetic, the three ways to give up, stops, and the async form."""

import asyncio
import threading
import time

import pytest

from cadence.retry import Backoff, Retry, aretry, keep_running, retry


class Flaky:
    """Fails `failures` times with `error`, then returns "ok"."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.left, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise self.error("down")
        return "ok"


def test_backoff_doubles_up_to_the_cap_and_jitter_stays_in_its_band() -> None:
    assert [Backoff(0.1, cap=0.5).delay(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert [Backoff(1.0, factor=1.0).delay(n) for n in (1, 5)] == [1.0, 1.0]
    jittered = [Backoff(0.2, cap=5.0, jitter=True).delay(3) for _ in range(200)]
    assert all(0.4 <= d < 0.8 for d in jittered) and max(jittered) - min(jittered) > 0.1


def test_attempts_patience_and_deadline_each_end_a_loop() -> None:
    loop = Retry(Backoff(0.01), attempts=2)
    assert [loop.failed(), loop.failed(), loop.failed()] == [0.01, 0.02, None]
    patient = Retry(Backoff(0.01), patience=0.05)
    assert patient.failed() == 0.01
    time.sleep(0.06)
    assert patient.failed() is None
    bounded = Retry(Backoff(1.0), deadline=time.monotonic() + 1.5)
    assert bounded.failed() == 1.0 and bounded.failed() is None  # a 2 s wait would end past the deadline
    assert Retry(Backoff(0.1), deadline=time.monotonic() + 10).failed(at_least=3.0) == 3.0
    loop.succeeded()
    assert loop.failed() == 0.01


def test_retry_waits_out_matching_errors_and_raises_others_at_once() -> None:
    flaky, waits = Flaky(3), []
    result = retry(flaky, Retry(Backoff(0.001)), retry_on=ConnectionError, on_retry=lambda e, d: waits.append(d))
    assert (result, flaky.calls) == ("ok", 4) and waits == pytest.approx([0.001, 0.002, 0.004])
    wrong = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        retry(wrong, Retry(Backoff(0.001)), retry_on=ConnectionError)
    assert wrong.calls == 1
    with pytest.raises(ConnectionError):
        retry(Flaky(5), Retry(Backoff(0.001), attempts=2), retry_on=lambda e: isinstance(e, OSError))


def test_give_up_and_stop_end_a_retry() -> None:
    flaky = Flaky(5)
    with pytest.raises(ConnectionError):
        retry(flaky, Retry(Backoff(0.001)), retry_on=ConnectionError, give_up=lambda: flaky.calls >= 2)
    assert flaky.calls == 2
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        retry(Flaky(100), Retry(Backoff(30.0)), retry_on=ConnectionError, stop=stop)  # the stop cuts the 30 s wait
    assert time.monotonic() - started < 5


def test_aretry_is_the_same_loop_for_coroutines() -> None:
    flaky = Flaky(2)

    async def call() -> str:
        return flaky()

    assert asyncio.run(aretry(call, Retry(Backoff(0.001)), retry_on=ConnectionError)) == "ok"
    failing = Flaky(5)

    async def fail() -> str:
        return failing()

    with pytest.raises(ConnectionError):
        asyncio.run(aretry(fail, Retry(Backoff(0.001), attempts=1), retry_on=OSError))
    assert failing.calls == 2


def test_keep_running_backs_off_resets_on_success_and_stops() -> None:
    stop, outcomes, waits = threading.Event(), iter([1, 1, 0, 1, None]), []

    def step() -> None:
        outcome = next(outcomes)
        if outcome is None:
            stop.set()
        elif outcome:
            raise RuntimeError("step failed")

    keep_running(step, stop, Retry(Backoff(0.001)), on_failure=lambda e, d: waits.append(d))
    assert waits == pytest.approx([0.001, 0.002, 0.001])  # the success in between reset the backoff
    with pytest.raises(KeyError):
        keep_running(lambda: {}["x"], threading.Event(), Retry(Backoff(0.001)), retry_on=RuntimeError)
