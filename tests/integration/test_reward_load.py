"""The reward service under a load it cannot carry: `cadence serve reward` as its own process, an asyncio
client on loopback. First its capacity is measured (closed loop), then requests arrive open-loop at twice
that rate for a bounded time: the service must shed the excess with 429 + Retry-After, keep the latency of
what it answers bounded, never answer 5xx or drop a connection, and be healthy afterwards.

Bounded: at most `MAX_REQUESTS` requests and about 25 s in all; figures are printed (run with -s).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from cadence.net import free_port

ITEMS_PER_REQUEST = 8
MAX_INFLIGHT_REQUESTS = 4
MAX_INFLIGHT_ITEMS = MAX_INFLIGHT_REQUESTS * ITEMS_PER_REQUEST
MEASURE_SECONDS = 4.0
OVERLOAD_SECONDS = 10.0
MAX_REQUESTS = 4000
P99_BOUND_SECONDS = 3.0


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    http_port = free_port()
    args = ["serve", "reward", "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(free_port())]
    env = {
        **os.environ,
        "CADENCE_WORKER": "false",
        "CADENCE_POOL_PROCESSES": "1",
        "CADENCE_MAX_INFLIGHT_ITEMS": str(MAX_INFLIGHT_ITEMS),
        "CADENCE_MAX_INFLIGHT_REQUESTS": str(MAX_INFLIGHT_REQUESTS),
    }
    proc = subprocess.Popen([sys.executable, "-m", "cadence.app.cli", *args], env=env)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "cadence serve reward did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def body(n: int) -> dict:
    """Fractions and roots: math-verify parses and compares each (scoring, not HTTP, is the cost)."""
    items = [
        {
            "response": f"so x = \\boxed{{\\frac{{{n + k}}}{{\\sqrt{{{k + 2}}}}}}}",
            "reference": f"{n + k}/sqrt({k + 2 + k % 2})",
        }
        for k in range(ITEMS_PER_REQUEST)
    ]
    return {"items": items}


async def measure_capacity(client: httpx.AsyncClient, concurrency: int = MAX_INFLIGHT_REQUESTS) -> float:
    """Requests per second the service completes with `concurrency` clients that never wait."""
    done = 0
    end = time.monotonic() + MEASURE_SECONDS

    async def worker(offset: int) -> None:
        nonlocal done
        n = offset
        while time.monotonic() < end:
            reply = await client.post("/v1/score", json=body(n))
            assert reply.status_code == 200, reply.text
            done += 1
            n += concurrency

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.monotonic() - started)


async def overload(client: httpx.AsyncClient, rate: float) -> list[tuple[int | str, float]]:
    """Send at `rate` requests/s regardless of replies (open loop); (status or error, latency) of each."""
    results: list[tuple[int | str, float]] = []

    async def one(n: int) -> None:
        started = time.monotonic()
        try:
            reply = await client.post("/v1/score", json=body(n))
            outcome: int | str = reply.status_code
            if reply.status_code == 429:
                assert int(reply.headers["Retry-After"]) >= 1
        except httpx.HTTPError as error:
            outcome = type(error).__name__
        results.append((outcome, time.monotonic() - started))

    count = min(MAX_REQUESTS, int(rate * OVERLOAD_SECONDS))
    tasks, start = [], time.monotonic()
    for n in range(count):
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_twice_the_capacity_is_shed_with_429_and_latency_stays_bounded(service_url: str) -> None:
    async def scenario() -> tuple[float, list[tuple[int | str, float]]]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=service_url, timeout=30, limits=limits) as client:
            capacity = await measure_capacity(client)
            return capacity, await overload(client, 2 * capacity)

    capacity, results = asyncio.run(scenario())
    outcomes = Counter(outcome for outcome, _ in results)
    answered = [latency for outcome, latency in results if outcome == 200]
    all_latencies = [latency for _, latency in results]
    figures = {
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(2 * capacity, 1),
        "requests": len(results),
        "outcomes": dict(outcomes),
        "rate_429": round(outcomes[429] / len(results), 3),
        "p50_s": round(percentile(all_latencies, 0.5), 3),
        "p99_s": round(percentile(all_latencies, 0.99), 3),
        "p99_200_s": round(percentile(answered, 0.99), 3) if answered else None,
        "served_rps": round(len(answered) / OVERLOAD_SECONDS, 1),
    }
    print("reward load:", figures)
    assert set(outcomes) <= {200, 429}, f"only answers or 429 are allowed under load: {figures}"
    assert outcomes[429] > 0, f"twice the capacity must be shed with 429: {figures}"
    assert outcomes[200] > 0.3 * capacity * OVERLOAD_SECONDS, f"the service must keep serving: {figures}"
    assert figures["p99_s"] < P99_BOUND_SECONDS, f"p99 latency unbounded under overload: {figures}"
    ready = httpx.get(f"{service_url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert httpx.post(f"{service_url}/v1/score", json=body(0), timeout=10).status_code == 200


def test_a_burst_of_small_requests_is_shed_not_queued(service_url: str) -> None:
    """Requests too small for the item admission to notice: the request limit sheds them instead of letting
    them queue for a worker thread; the service answers normally right after."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service_url, timeout=30, limits=httpx.Limits(max_connections=300)) as c:
            one = [{"response": "\\boxed{1}", "reference": "1"}]
            return await asyncio.gather(*(c.post("/v1/score", json={"items": one}) for _ in range(300)))

    replies = asyncio.run(burst())
    outcomes = Counter(reply.status_code for reply in replies)
    print("reward burst:", dict(outcomes))
    assert set(outcomes) <= {200, 429} and outcomes[200] >= MAX_INFLIGHT_REQUESTS, outcomes
    shed = [reply.json()["message"] for reply in replies if reply.status_code == 429]
    assert any("scoring requests in progress" in message for message in shed), shed[:3]
    assert httpx.post(f"{service_url}/v1/score", json=body(0), timeout=10).status_code == 200
