"""API keys never reach a log: `cadence serve reward` with a key, at DEBUG level, called over HTTP and gRPC
with the right key, a wrong key and malformed headers; its whole output must hold neither key."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx

from cadence.grpc import channel
from cadence.net import free_port
from cadence.v1 import reward_pb2, reward_pb2_grpc


def test_api_keys_never_appear_in_logs_or_metrics(tmp_path: Path) -> None:
    key, wrong = f"key-{secrets.token_hex(16)}", f"wrong-{secrets.token_hex(16)}"
    http_port, grpc_port = free_port(), free_port()
    args = ["serve", "reward", "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    env = {
        **os.environ,
        "CADENCE_API_KEYS": key,
        "CADENCE_LOG_LEVEL": "DEBUG",
        "CADENCE_WORKER": "false",
        "CADENCE_POOL_PROCESSES": "1",
        "CADENCE_MAX_BODY_BYTES": "4096",
    }
    log_path = tmp_path / "reward.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cadence.app.cli", *args], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(url, proc)
        body = {"items": [{"response": "\\boxed{2}", "reference": "2"}]}
        statuses = [
            httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": f"Bearer {key}"}).status_code,
            httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": f"Bearer {wrong}"}).status_code,
            httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": wrong}).status_code,
            httpx.post(f"{url}/v1/score", json=body).status_code,
            httpx.post(
                f"{url}/get_reward", content=b"{" * 8192, headers={"Authorization": f"Bearer {wrong}"}
            ).status_code,
        ]
        assert statuses == [200, 403, 401, 401, 413]
        with channel(f"127.0.0.1:{grpc_port}") as chan:
            stub = reward_pb2_grpc.RewardStub(chan)
            request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(response="\\boxed{2}", reference="2")])
            assert stub.Score(request, metadata=[("authorization", f"Bearer {key}")]).results[0].reward == 1.0
            for metadata in ([("authorization", f"Bearer {wrong}")], [("authorization", wrong)], []):
                try:
                    stub.Score(request, metadata=metadata)
                    raise AssertionError("a wrong key was accepted")
                except grpc.RpcError as error:
                    assert error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
                    assert wrong not in (error.details() or "")
        exposed = httpx.get(f"{url}/metrics").text
        assert key not in exposed and wrong not in exposed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log_path.read_text(errors="replace")
    assert "reward HTTP listening" in text, "the log was not captured"
    for secret in (key, wrong, key[4:20], wrong[6:22]):
        assert secret not in text, f"an API key (or part of it) was logged:\n{text[-2000:]}"


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("cadence serve reward did not become ready")
