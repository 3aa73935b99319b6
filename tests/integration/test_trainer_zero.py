"""ZeRO-2 across two processes (torchrun, gloo) computes the same losses as ZeRO-0 in one process, also
with the shards cut into micro-batches (gradient accumulation, a different micro-batch count per rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cadence.net import free_port

WORKER = Path(__file__).with_name("trainer_zero_worker.py")


def run(args: list[str], tmp_path: Path) -> None:
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_zero2_two_processes_matches_zero0_one_process(untrained_tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each rank trains on half of the 4 pairs; DeepSpeed averages the gradients, which equals the
    single-process gradient of the mean over all 4, so the three losses agree up to float rounding."""
    single, double = tmp_path / "zero0.json", tmp_path / "zero2.json"
    run([sys.executable, str(WORKER), str(untrained_tiny_model_dir), "0", str(single)], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run([*torchrun, str(WORKER), str(untrained_tiny_model_dir), "2", str(double)], tmp_path)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["losses"][0] == pytest.approx(0.693147, abs=1e-5)
    assert two["losses"] == pytest.approx(one["losses"], abs=2e-5)
    assert two["losses"][2] < two["losses"][0] - 1e-3


@pytest.mark.parametrize("algorithm", ["dpo", pytest.param("grpo", marks=pytest.mark.slow)])
def test_micro_batched_zero2_matches_one_shot_zero0(
    untrained_tiny_model_dir: Path, tmp_path: Path, algorithm: str
) -> None:
    """One process, ZeRO-0, each shard in one pass vs two processes, ZeRO-2, micro-batches of ≤ 28 tokens
    (DPO: rank 0's pairs of 11 and 7 tokens go one per micro-batch, rank 1's two 7-token pairs share one, so
    rank 1 runs a zero-weight padding pass; GRPO: rollouts of 7–11 tokens, two or three per micro-batch).
    Three steps: the losses and the weights after them agree up to float rounding."""
    single, double = tmp_path / "zero0.json", tmp_path / "zero2.json"
    run([sys.executable, str(WORKER), str(untrained_tiny_model_dir), "0", str(single), algorithm], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run([*torchrun, str(WORKER), str(untrained_tiny_model_dir), "2", str(double), algorithm, "28"], tmp_path)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["losses"] == pytest.approx(one["losses"], abs=2e-5)
    assert two["weight"] == pytest.approx(one["weight"], abs=1e-5)
    assert two["losses"][2] < two["losses"][0] - 1e-4
