"""The reward image alone, as a product: hardened like the chart runs it, API keys from a mounted file, the
HTTP API (`/healthz`, `/v1/score`, `/get_reward`) answering from the container."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cadence.net import free_port

from .conftest import Engine

NAME = "cadence-containers-test-reward"


def _call(port: int, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_healthy(port: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _call(port, "/healthz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"the reward container did not answer /healthz within {timeout:.0f}s")


@pytest.mark.timeout(3600)  # builds the images on first use
def test_reward_image_serves_alone_with_api_keys_from_a_file(engine: Engine, images: dict[str, str], tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("first-key\nsecond-key\n")
    keys.chmod(0o644)
    port = free_port()
    engine("rm", "-f", NAME, check=False)
    engine(
        "run", "-d", "--name", NAME, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp", "--tmpfs", "/var/cache/cadence", "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{keys}:/etc/cadence/api-keys/keys:ro", "-e", "CADENCE_API_KEYS_FILE=/etc/cadence/api-keys/keys",
        "-e", "CADENCE_WORKER=false", images["reward"],
    )  # fmt: skip
    try:
        _wait_healthy(port)
        items = {"items": [{"response": "2 + 2 = \\boxed{4}", "reference": "4"}, {"response": "5", "reference": "4"}]}
        status, reply = _call(port, "/v1/score", items)
        assert status == 401 and "Authorization: Bearer" in json.dumps(reply)
        assert _call(port, "/v1/score", items, key="not-a-key")[0] == 403  # known header, unknown key
        status, reply = _call(port, "/v1/score", items, key="second-key")
        assert status == 200 and [r["reward"] for r in reply["results"]] == [1.0, 0.0], reply
        openrlhf = {"query": ["1+1? \\boxed{2}", "1+1? 3"], "labels": ["2", "2"]}
        status, reply = _call(port, "/get_reward", openrlhf, key="first-key")
        assert status == 200 and reply["rewards"] == [1.0, 0.0], reply
    finally:
        logs = engine("logs", NAME, check=False)
        engine("rm", "-f", NAME, check=False)
    assert engine("ps", "-a", "-q", "--filter", f"name={NAME}").stdout.split() == []
    assert "first-key" not in logs.stdout + logs.stderr, "API keys never reach the log"
