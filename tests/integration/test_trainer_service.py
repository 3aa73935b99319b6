"""`cadence serve trainer` as a real process: run meta in Redis, gRPC Status and Stop, checkpoint on stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from cadence import streams
from cadence.config import load_run_config
from cadence.grpc import channel, wait_healthy
from cadence.net import free_port
from cadence.v1 import trainer_pb2, trainer_pb2_grpc

from .test_trainer_loop import Generator, broker_target  # noqa: F401  (the broker fixture)


def clean_env() -> dict[str, str]:
    """This process's environment without the rendezvous variables an in-process engine test may have set
    (a child inheriting MASTER_PORT would try to bind a port this process already holds)."""
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in dist} | {"OMP_NUM_THREADS": "1"}


def config_of(run_id: str, model: Path, steps: int, **extra: Any) -> dict[str, Any]:
    """A toy run's config for a trainer process (s = 1, 2 prompts of 2 samples a step)."""
    return {
        "run_id": run_id,
        "model": {"path": str(model)},
        "steps": steps,
        "batch_prompts": 2,
        "sync_every": 1,
        "sampling": {"n": 2, "max_tokens": 14},
        "tasks": [{"name": "toy", "limit": 40}],
    } | extra


@pytest.fixture
def trainer_process(
    redis_url: str,
    broker_target: str,  # noqa: F811
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen, str]]:
    config = config_of("svc", untrained_tiny_model_dir, 200, tasks=[{"name": "toy", "limit": 20}])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    args = [sys.executable, "-m", "cadence.app.cli", "serve", "trainer", "--config", str(tmp_path / "run.yaml")]
    args += ["--grpc-port", str(port), "--broker-addr", broker_target, "--redis-url", redis_url]
    args += ["--run-dir", str(tmp_path / "run"), "--host", "127.0.0.1"]
    proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, f"127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_reports_status_and_stops_cleanly(
    trainer_process: tuple[subprocess.Popen, str],
    redis_url: str,
    broker_target: str,  # noqa: F811
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    proc, target = trainer_process
    generator = Generator(redis_url, "svc", broker_target, AutoTokenizer.from_pretrained(untrained_tiny_model_dir))
    generator.start()
    try:
        try:
            wait_healthy(target, timeout=120)
        except Exception:
            proc.kill()
            raise AssertionError(proc.communicate()[0][-3000:]) from None
        with channel(target) as chan:
            stub = trainer_pb2_grpc.TrainerStub(chan)
            deadline = time.monotonic() + 60
            while (status := stub.Status(trainer_pb2.TrainerStatusRequest())).step < 3:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.2)
            assert status.run_id == "svc" and status.total_steps == 200 and status.state == "training"
            assert status.version >= 2 and "loss" in status.metrics
            stub.Stop(trainer_pb2.StopRequest(reason="test"))
        output, _ = proc.communicate(timeout=60)
    finally:
        generator.stop()
    assert proc.returncode == 0, output[-3000:]
    meta = streams.read_meta(streams.connect(redis_url), "svc")
    assert meta["state"] == "stopped"
    assert load_run_config(tmp_path / "run.yaml").model_dump(mode="json") == yaml.safe_load(meta["config"])
    run_dir = tmp_path / "run" / "svc"  # CADENCE_RUN_DIR is the root of every run's folder
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{meta['step']}"
    assert len((run_dir / "ledger.jsonl").read_text().splitlines()) == int(meta["step"])


@pytest.mark.slow
def test_two_process_zero2_run_under_torchrun(
    redis_url: str,
    broker_target: str,  # noqa: F811
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """The multi-process form: `torchrun --nproc-per-node 2 -m cadence.trainer.main --config RUN.yaml`
    with ZeRO-2 trains s = 2 for 4 steps, publishes versions 2 and 4 and saves the final model."""
    toy = [{"name": "toy", "limit": 20}]
    config = config_of("ddp", untrained_tiny_model_dir, 4, sync_every=2, tasks=toy, deepspeed={"zero_stage": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    args += ["--master-port", str(free_port()), "-m", "cadence.trainer.main", "--config", str(tmp_path / "run.yaml")]
    args += ["--grpc-port", str(free_port()), "--broker-addr", broker_target, "--redis-url", redis_url]
    args += ["--run-dir", str(tmp_path / "run"), "--host", "127.0.0.1"]
    generator = Generator(redis_url, "ddp", broker_target, AutoTokenizer.from_pretrained(untrained_tiny_model_dir))
    generator.start()
    try:
        done = subprocess.run(args, env=clean_env(), capture_output=True, text=True, timeout=400)
    finally:
        generator.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ledger = (tmp_path / "run" / "ddp" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["policy_versions"] for line in ledger] == [[0, 0], [0, 0], [2, 2], [2, 2]]
    assert streams.read_meta(streams.connect(redis_url), "ddp")["version"] == "4"
    assert (tmp_path / "run" / "ddp" / "final" / "config.json").exists()
