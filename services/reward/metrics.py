"""Prometheus metrics of the reward service (one registry per process, shared by every front)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from cadence.reward.scoring import Result

REQUESTS = Counter(
    "cadence_reward_requests_total",
    "Scoring requests by transport, endpoint and status.",
    ["transport", "endpoint", "code"],
)
LATENCY = Histogram(
    "cadence_reward_request_seconds",
    "Scoring request latency.",
    ["transport", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ITEMS = Counter("cadence_reward_items_total", "Scored items by task and reason.", ["task", "reason"])
POOL_RESTARTS = Gauge("cadence_reward_pool_restarts", "math-verify worker processes killed and replaced.")
IN_FLIGHT = Gauge("cadence_reward_items_in_flight", "Items being scored now.")
WORKER_ROLLOUTS = Counter("cadence_reward_worker_rollouts_total", "Rollouts scored and forwarded by the queue worker.")
WORKER_FAILURES = Counter(
    "cadence_reward_worker_failures_total", "Queue-worker scoring attempts that failed and will be retried."
)


def observe_items(results: Sequence[Result]) -> None:
    for result in results:
        ITEMS.labels(result.task, result.reason).inc()


def track(restarts: Callable[[], float], in_flight: Callable[[], float]) -> None:
    """Read gauges from the live objects at scrape time."""
    POOL_RESTARTS.set_function(restarts)
    IN_FLIGHT.set_function(in_flight)
