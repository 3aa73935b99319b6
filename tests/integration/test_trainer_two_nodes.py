"""A two-node trainer (ZeRO-2), played as two torchrun launches of one rank each (gloo, CPU), as two trainer
pods would run it: killed after a checkpoint and restarted together.

Rank 0 alone writes `latest`, the frozen models and DeepSpeed's model states. With a shared run folder the
restarted ranks resume together from the checkpoint; with a folder per node (a ReadWriteOnce volume per
pod) rank 1 sees no checkpoint, and instead of rank 0 loading while rank 1 starts fresh (a hang in the
collective load, or silently different weights per rank), both fail at once naming the storage.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from transformers import AutoTokenizer

from cadence.net import free_port

from .test_trainer_lifecycle import RESUMED
from .test_trainer_loop import Generator, broker_target  # noqa: F401  (the broker fixture)
from .test_trainer_service import clean_env

STEPS = 10
FAIL_WITHIN_SECONDS = 180
"""Start-up (two DeepSpeed engines on 2 loaded cores) plus the agreement; a hang would last the collective's
timeout (30 min for gloo)."""


def launch(node: int, port: int, config: Path, run_dir: Path, redis_url: str, broker: str, log: Path) -> Any:
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
    args += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    args += ["-m", "cadence.trainer.main", "--config", str(config), "--run-dir", str(run_dir)]
    args += ["--grpc-port", str(free_port()), "--broker-addr", broker, "--redis-url", redis_url, "--host", "127.0.0.1"]
    return subprocess.Popen(args, env=clean_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL the node's launcher and its worker (torchrun starts workers in their own session)."""
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    proc.wait()


def ledger_steps(folder: Path) -> int:
    path = folder / "ledger.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def start_nodes(tmp: Path, folders: tuple[Path, Path], tag: str, redis_url: str, broker: str) -> list[Any]:
    port = free_port()
    config = tmp / "two-nodes.yaml"
    return [
        launch(node, port, config, folders[node], redis_url, broker, tmp / f"{tag}-node{node}.log") for node in (0, 1)
    ]


@pytest.mark.slow  # two ZeRO-2 launches started twice: ~2-4 min on 2 cores, 6-7 min heavily loaded
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("storage", ["shared", "per-node"])
def test_a_killed_two_node_trainer_resumes_or_fails_loudly(
    storage: str,
    redis_url: str,
    broker_target: str,  # noqa: F811
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    config = {
        "run_id": "nodes",
        "model": {"path": str(untrained_tiny_model_dir)},
        "steps": STEPS,
        "batch_prompts": 2,
        "sync_every": 1,
        "checkpoint_every": 2,
        "sampling": {"n": 2, "max_tokens": 14},
        "tasks": [{"name": "toy", "limit": 40}],
        "deepspeed": {"zero_stage": 2},
    }
    (tmp_path / "two-nodes.yaml").write_text(yaml.safe_dump(config))
    shared = tmp_path / "runs"
    folders = (shared, shared) if storage == "shared" else (tmp_path / "node0", tmp_path / "node1")
    run0 = folders[0] / "nodes"
    generator = Generator(redis_url, "nodes", broker_target, AutoTokenizer.from_pretrained(untrained_tiny_model_dir))
    generator.start()
    nodes: list[Any] = []
    try:
        nodes = start_nodes(tmp_path, folders, "first", redis_url, broker_target)
        deadline = time.monotonic() + 300
        while not (run0 / "checkpoints" / "step-4").exists() or ledger_steps(run0) < 5:
            assert all(n.poll() is None for n in nodes), (tmp_path / "first-node0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first-node0.log").read_text()[-3000:]
            time.sleep(0.1)
        for node in nodes:
            kill_node(node)
        checkpointed = (run0 / "checkpoints" / "latest").read_text().strip()
        started = time.monotonic()
        nodes = start_nodes(tmp_path, folders, "again", redis_url, broker_target)
        codes = [node.wait(timeout=FAIL_WITHIN_SECONDS + 240) for node in nodes]
        took = time.monotonic() - started
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
        generator.stop()
    logs = [(tmp_path / f"again-node{n}.log").read_text() for n in (0, 1)]
    if storage == "shared":
        assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        assert [found.group(1) for log in logs if (found := RESUMED.search(log))] == [checkpointed] * 2
        assert ledger_steps(run0) == STEPS and (run0 / "final" / "config.json").exists()
    else:
        assert codes[0] != 0 and codes[1] != 0, logs[0][-3000:] + logs[1][-3000:]
        assert took < FAIL_WITHIN_SECONDS, f"the ranks took {took:.0f}s to fail"
        for log in logs:
            assert "the trainer ranks see different run folders" in log, log[-3000:]
            assert f"rank 0: checkpoint {checkpointed}" in log and "rank 1: checkpoint none" in log
        assert not RESUMED.search(logs[0]), "rank 0 loaded a checkpoint rank 1 does not have"
