"""The reward service's HTTP and gRPC fronts, really served on loopback ports with real math-verify.

Two services: `open_service` (auth off, math + a tiny random RM for chat) and `strict_service` (API keys,
a 256 KiB body limit, room for only 8 items in flight, one pool process, a 1 s item deadline).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cadence.clients import RewardClient, ScoreItem
from cadence.errors import InvalidRequest, PermissionDenied
from cadence.net import free_port
from cadence.reward.main import RewardService
from cadence.reward.settings import RewardSettings
from cadence.v1 import reward_pb2, reward_pb2_grpc

KEY = "s3cret-key"


def _serve(**overrides: object) -> RewardService:
    base = {"host": "127.0.0.1", "http_port": free_port(), "grpc_port": free_port(), "worker": False}
    service = RewardService(RewardSettings(**{**base, "rm_device": "cpu", **overrides}))
    service.start()
    return service


@pytest.fixture(scope="module")
def open_service(random_rm_dir: Path) -> Iterator[RewardService]:
    service = _serve(reward_model=str(random_rm_dir), pool_processes=2, item_timeout_seconds=2.0)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def strict_service() -> Iterator[RewardService]:
    service = _serve(
        api_keys=KEY, pool_processes=1, item_timeout_seconds=1.0, max_body_bytes=256 * 1024, max_inflight_items=8
    )
    yield service
    service.stop()


def url(service: RewardService) -> str:
    return f"http://127.0.0.1:{service.settings.http_port}"


def target(service: RewardService) -> str:
    return f"127.0.0.1:{service.grpc.port}"


# --- HTTP: the three request shapes ---------------------------------------------------------------


def test_native_batch_mixes_tasks(open_service: RewardService) -> None:
    items = [
        {"prompt": "What is 2+2?", "response": "so \\boxed{4}", "reference": "4", "task": "math"},
        {"prompt": "What is 2+2?", "response": " \\boxed{4}", "task": "chat"},
        {"prompt": "What is 2+2?", "response": "so \\boxed{5}", "reference": "4"},
        {"prompt": "x", "response": "no box", "reference": "\\dfrac{1}{9}"},
    ]
    reply = httpx.post(f"{url(open_service)}/v1/score", json={"items": items})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [(r["task"], r["reason"]) for r in results] == [
        ("math", "correct"),
        ("chat", "scored"),
        ("math", "incorrect"),
        ("math", "no_answer"),
    ]
    assert [r["reward"] for r in results][::2] == [1.0, 0.0]
    assert results[0]["scorer_version"].startswith("math-verify-")


def test_openrlhf_shape(open_service: RewardService) -> None:
    prompts = ["Q: 1+1=? A:", "Q: 2+3=? A:"]
    body = {"query": [prompts[0] + " \\boxed{2}", prompts[1] + " \\boxed{6}"], "prompts": prompts, "labels": ["2", "5"]}
    reply = httpx.post(f"{url(open_service)}/get_reward", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["rewards"] == [1.0, 0.0] and data["scores"] == [1.0, 0.0]
    assert data["extra_logs"] == {"reason_correct": [1.0, 0.0], "reason_incorrect": [0.0, 1.0]}


def test_openrlhf_without_labels_goes_to_the_reward_model(open_service: RewardService) -> None:
    reply = httpx.post(f"{url(open_service)}/get_reward", json={"query": ["What is 1+1? \\boxed{2}"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["extra_logs"] == {"reason_scored": [1.0]}


def test_slime_shape(open_service: RewardService) -> None:
    reply = httpx.post(f"{url(open_service)}/v1/reward", json={"prompt": "p", "response": "\\boxed{12}", "label": 12})
    assert reply.json() == {"reward": 1.0, "reason": "correct"}
    reply = httpx.post(f"{url(open_service)}/v1/reward", json={"prompt": "p", "response": "twelve", "label": "12"})
    assert reply.json() == {"reward": 0.0, "reason": "no_answer"}


# --- HTTP: bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/score", {"items": [{"response": 5, "reference": "1"}]}, "items[0].response"),
        ("/v1/score", {"items": [{"reference": "1"}]}, "items[0].response"),
        ("/v1/score", {"items": [{"response": "a", "reference": "1", "task": "poetry"}]}, "items[0].task"),
        ("/v1/score", {"items": "all of them"}, "items"),
        ("/v1/score", [1, 2], "body"),
        ("/v1/score", {"items": [{"response": "a", "reference": "1"}, {"response": "a"}]}, "items[1].reference"),
        ("/v1/score", {"items": [{"response": "a", "reference": "1"}] * 1025}, "items"),
        ("/v1/score", {"items": [{"response": "a" * 65537, "reference": "1"}]}, "items[0].response"),
        ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, "prompts"),
        ("/get_reward", {"query": [["nested"]]}, "query[0]"),
        ("/v1/reward", {"prompt": "p", "label": "1"}, "response"),
        ("/v1/reward", {"prompt": "p", "response": "r", "label": {"a": 1}}, "label"),
    ],
)
def test_bad_input_is_422_naming_the_field(open_service: RewardService, path: str, body: object, field: str) -> None:
    reply = httpx.post(url(open_service) + path, json=body)
    assert reply.status_code == 422, reply.text
    data = reply.json()
    assert data["error"] == "InvalidRequest"
    assert data["message"].startswith(field), data["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"null",
        b"[" * 50_000 + b"]" * 50_000,
        b'{"items": [{"response": "\\ud800", "reference": "1"}]}',
    ],
)
def test_garbage_never_gives_a_5xx(open_service: RewardService, raw: bytes) -> None:
    for path in ("/v1/score", "/get_reward", "/v1/reward"):
        reply = httpx.post(url(open_service) + path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= reply.status_code < 500, (path, raw[:40], reply.status_code, reply.text)
    assert httpx.get(f"{url(open_service)}/healthz").status_code == 200


def test_body_over_the_limit_is_413(strict_service: RewardService) -> None:
    body = json.dumps({"items": [{"response": "x" * 60_000, "reference": "1"}] * 5}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    reply = httpx.post(f"{url(strict_service)}/v1/score", content=body, headers=headers)
    assert reply.status_code == 413
    assert "exceeds 262144 bytes" in reply.json()["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield from (body[i : i + 65536] for i in range(0, len(body), 65536))

    assert httpx.post(f"{url(strict_service)}/v1/score", content=chunked(), headers=headers).status_code == 413


@pytest.mark.parametrize(
    "response",
    [
        "x" * 60_000,
        "{" * 10_000 + "}" * 10_000,
        "9" * 60_000,
        "\\boxed{" + "9" * 60_000 + "}",
        "the answer is \\boxed{",
        "\\boxed{10^{10^{10}}}",
    ],
)
def test_pathological_answers_are_bounded_and_the_service_answers_next(
    strict_service: RewardService, response: str
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    started = time.monotonic()
    reply = httpx.post(
        f"{url(strict_service)}/v1/score", json={"items": [{"response": response, "reference": "1"}]}, headers=headers
    )
    assert reply.status_code == 200
    assert reply.json()["results"][0]["reason"] in ("incorrect", "no_answer", "timeout")
    assert time.monotonic() - started < strict_service.settings.item_timeout_seconds + 3.0
    after = httpx.post(
        f"{url(strict_service)}/v1/reward", json={"response": "\\boxed{1}", "label": "1"}, headers=headers
    )
    assert after.json() == {"reward": 1.0, "reason": "correct"}


# --- auth ----------------------------------------------------------------------------------------


def test_http_auth(strict_service: RewardService, open_service: RewardService) -> None:
    body = {"response": "\\boxed{1}", "label": "1"}
    endpoint = f"{url(strict_service)}/v1/reward"
    missing = httpx.post(endpoint, json=body)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.post(endpoint, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.post(endpoint, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(url(strict_service) + open_path).status_code == 200
    assert httpx.post(f"{url(open_service)}/v1/reward", json=body).status_code == 200


def test_grpc_auth(strict_service: RewardService) -> None:
    request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(response="\\boxed{1}", reference="1", task="math")])
    with grpc.insecure_channel(target(strict_service)) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Score(request, timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Score(request, metadata=[("authorization", "Bearer nope")], timeout=10)
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = stub.Score(request, metadata=[("authorization", f"Bearer {KEY}")], timeout=10)
        assert reply.results[0].reason == "correct"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_strict_format_from_the_environment_scores_run_on_answers_zero(
    open_service: RewardService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`strict_format: true` reaches the reward service as `CADENCE_STRICT_FORMAT` (the launcher, the
    chart): a right box followed by more text (the toy's length collapse, `\\boxed{167}6}`) scores 0 there,
    1 on a lenient service; a box that ends the answer scores 1 on both."""
    monkeypatch.setenv("CADENCE_STRICT_FORMAT", "1")
    strict = _serve(pool_processes=1, item_timeout_seconds=2.0)
    items = [{"response": " \\boxed{167}6}", "reference": "167"}, {"response": " \\boxed{167}", "reference": "167"}]
    try:
        replies = [httpx.post(f"{url(s)}/v1/score", json={"items": items}) for s in (open_service, strict)]
    finally:
        strict.stop()
    lenient, strict_results = (reply.json()["results"] for reply in replies)
    assert [(r["reason"], r["reward"]) for r in lenient] == [("correct", 1.0), ("correct", 1.0)]
    assert [(r["reason"], r["reward"]) for r in strict_results] == [("trailing_text", 0.0), ("correct", 1.0)]


# --- gRPC ----------------------------------------------------------------------------------------


def test_grpc_score_and_status(open_service: RewardService) -> None:
    items = [
        reward_pb2.ScoreItem(prompt="q", response="\\boxed{\\frac{1}{2}}", reference="0.5", task="math"),
        reward_pb2.ScoreItem(prompt="What is 1+1?", response=" \\boxed{2}", task="chat"),
        reward_pb2.ScoreItem(response="\\boxed{3}", reference="4"),
    ]
    with grpc.insecure_channel(target(open_service)) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)
        reply = stub.Score(reward_pb2.ScoreRequest(items=items), timeout=10)
        assert [(r.task, r.reason) for r in reply.results] == [
            ("math", "correct"),
            ("chat", "scored"),
            ("math", "incorrect"),
        ]
        with pytest.raises(grpc.RpcError) as bad:
            stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(response="r", task="math")]), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items[0].reference" in bad.value.details()
        status = stub.Status(reward_pb2.RewardStatusRequest(), timeout=10)
        assert status.ready and list(status.tasks) == ["math", "chat"] and status.pool_processes == 2


# --- load ----------------------------------------------------------------------------------------


def test_many_clients_at_once_nothing_dropped(open_service: RewardService) -> None:
    def one_client(n: int) -> list[float]:
        with RewardClient(url(open_service), timeout=60) as client:
            items = [ScoreItem(response=f"\\boxed{{{n + k}}}", reference=str(n + k + k % 2)) for k in range(8)]
            return [result.reward for result in client.score(items)]

    with ThreadPoolExecutor(24) as pool:
        rewards = list(pool.map(one_client, range(48)))
    assert rewards == [[1.0, 0.0] * 4] * 48


def test_saturation_gives_429_with_retry_after_and_the_client_retries(strict_service: RewardService) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    stuck = {"response": "\\boxed{10^{10^{10}}}", "reference": "1"}  # holds a slot for the 1 s deadline
    slow = {"items": [stuck] + [{"response": "\\boxed{1}", "reference": "1"}] * 3}
    statuses: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        reply = httpx.post(f"{url(strict_service)}/v1/score", json=slow, headers=headers, timeout=60)
        with lock:
            statuses.append(reply)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [reply for reply in statuses if reply.status_code == 429]
    assert refused and all(int(reply.headers["Retry-After"]) >= 1 for reply in refused)
    assert all(reply.status_code in (200, 429) for reply in statuses)

    with (
        RewardClient(url(strict_service), api_key=KEY, timeout=60, backoff=0.2) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        results = list(pool.map(lambda n: client.score([ScoreItem(f"\\boxed{{{n}}}", str(n))] * 4), range(12)))
    assert all(r.reason == "correct" for batch in results for r in batch)


def test_client_raises_typed_errors(strict_service: RewardService) -> None:
    with RewardClient(url(strict_service), api_key="wrong") as client, pytest.raises(PermissionDenied):
        client.score([ScoreItem("\\boxed{1}", "1")])
    with RewardClient(url(strict_service), api_key=KEY) as client:
        with pytest.raises(InvalidRequest, match=r"items\[0\]\.reference"):
            client.score([ScoreItem("\\boxed{1}")])
        assert client.ready()


async def _async_scores(base: str) -> list[str]:
    from cadence.clients import AsyncRewardClient

    async with AsyncRewardClient(base) as client:
        return [r.reason for r in await client.score([ScoreItem("\\boxed{1}", "1"), ScoreItem("\\boxed{2}", "1")])]


def test_async_client(open_service: RewardService) -> None:
    import asyncio

    assert asyncio.run(_async_scores(url(open_service))) == ["correct", "incorrect"]


# --- health, metrics, docs -----------------------------------------------------------------------


def test_health_metrics_and_docs(open_service: RewardService) -> None:
    base = url(open_service)
    assert httpx.get(f"{base}/readyz").json()["ready"] is True
    metrics = httpx.get(f"{base}/metrics").text
    for name in (
        "cadence_reward_requests_total",
        "cadence_reward_request_seconds_bucket",
        "cadence_reward_items_total",
    ):
        assert name in metrics
    assert 'cadence_reward_items_total{reason="correct",task="math"}' in metrics
    assert "cadence_reward_pool_restarts" in metrics
    assert httpx.get(f"{base}/docs").status_code == 200
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    assert {"/v1/score", "/get_reward", "/v1/reward", "/healthz", "/readyz", "/metrics"} <= set(paths)
