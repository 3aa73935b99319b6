"""The bundled Redis under a long run (issue 16, finding 6): a memory ceiling that refuses writes instead of
evicting queued work, checked on a real redis-server started with the rendered arguments, and the
PrometheusRule's alerts reading metrics the trainer really exports."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from cadence.net import free_port
from cadence.trainer import retention

from .rendering import container, find


def test_the_bundled_redis_refuses_writes_when_full_instead_of_evicting(render_values, tmp_path: Path) -> None:
    docs = render_values({"redis": {"maxmemory": "3mb"}})
    args = container(find(docs, "StatefulSet", "rel-cadence-redis"), "redis")["args"]
    port = free_port()  # the rendered arguments as they are, but for the port and the data folder
    args[args.index("--port") + 1], args[args.index("--dir") + 1] = str(port), str(tmp_path)
    server = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, f"redis-server {args} did not start"
                time.sleep(0.05)
        payload = b"x" * 65536
        with pytest.raises(redis.ResponseError, match=r"not allowed when used memory > 'maxmemory'"):
            for index in range(200):  # 12.5 MiB: past the ceiling
                client.xadd("cadence:{r}:prompts", {b"m": payload + str(index).encode()})
        assert client.xlen("cadence:{r}:prompts") > 0  # nothing queued was evicted to make room
        assert client.xrange("cadence:{r}:prompts", count=1)[0][1][b"m"].endswith(b"0")
    finally:
        server.kill()
        server.wait()
    assert args[args.index("--maxmemory") + 1] == "3mb"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"


def test_the_prometheus_rule_alerts_on_what_the_trainer_exports(render_values) -> None:
    docs = render_values({"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}})
    rule = find(docs, "PrometheusRule", "rel-cadence-alerts")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"CadenceRedisMemoryHigh", "CadenceStreamGrowing"}
    trainer_service = find(docs, "Service", "rel-cadence-trainer")["metadata"]["name"]
    exported = {retention.REDIS_MEMORY._name, retention.STREAM_LENGTH._name}
    for alert in alerts.values():
        assert f'job="{trainer_service}"' in alert["expr"]
        assert any(name in alert["expr"] for name in exported), alert["expr"]
    assert "0.8 * max" in alerts["CadenceRedisMemoryHigh"]["expr"]
    assert not [d for d in render_values({}) if d["kind"] == "PrometheusRule"]  # off by default
