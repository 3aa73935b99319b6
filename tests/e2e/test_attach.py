"""Attach mode: services started once with no run id (as in docker-compose or Kubernetes) train a run that
`cadence run --attach` submits through Redis, then a second one, switching to it without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cadence.app.supervisor import Supervisor
from cadence.grpc import wait_healthy
from cadence.net import free_port

REPO = Path(__file__).resolve().parents[2]
SMALL = ["steps=3", "batch_prompts=4", "sampling.n=4", "sync_every=1"]


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "cadence.app.cli", *map(str, args)]


def submit(run_id: str, redis_url: str) -> None:
    args = cli("run", REPO / "configs" / "toy-online-dpo.yaml", "--attach")
    for override in [*SMALL, f"run_id={run_id}"]:
        args += ["--set", override]
    env = {**os.environ, "CADENCE_REDIS_URL": redis_url}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def wait_for_steps(runs: Path, run_id: str, steps: int, supervisor: Supervisor, timeout: float = 240) -> list[dict]:
    """The ledger of the run folder `runs/<run_id>-<timestamp>` once it has `steps` steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = next(runs.glob(f"{run_id}-*/ledger.jsonl"), None)
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path else []
        if len(rows) >= steps:
            return rows
        dead = supervisor.first_failure(ignore=("trainer",))
        assert dead is None, f"{dead.name} died:\n{dead.tail()}"
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} has fewer than {steps} steps after {timeout}s")


def test_services_without_a_run_id_train_submitted_runs(redis_server, tmp_path: Path, tiny_model_dir: Path) -> None:
    ports = {name: free_port() for name in ("broker", "reward", "reward_http", "inference", "trainer")}
    env = {
        "CADENCE_REDIS_URL": redis_server.url,
        "CADENCE_BROKER_ADDR": f"127.0.0.1:{ports['broker']}",
        "CADENCE_RUN_ID": "",
        "OMP_NUM_THREADS": "1",
    }
    supervisor = Supervisor(tmp_path / "logs", env=env)
    try:
        supervisor.start("broker", cli("serve", "broker", "--grpc-port", ports["broker"]))
        reward = ["--grpc-port", ports["reward"], "--http-port", ports["reward_http"]]
        supervisor.start("reward", cli("serve", "reward", *reward))
        engine = ["--engine", "hf", "--model", tiny_model_dir]
        supervisor.start("inference", cli("serve", "inference", "--grpc-port", ports["inference"], *engine))
        for name in ("broker", "reward", "inference"):
            wait_healthy(f"127.0.0.1:{ports[name]}", timeout=120)
        for run_id in ("attached-1", "attached-2"):
            trainer = cli("serve", "trainer", "--run-dir", tmp_path / "runs", "--grpc-port", ports["trainer"])
            supervisor.start("trainer", trainer)  # one trainer per run, as a restarting pod would
            submit(run_id, redis_server.url)
            rows = wait_for_steps(tmp_path / "runs", run_id, 3, supervisor)
            assert [sorted(set(row["policy_versions"])) for row in rows] == [[0], [1], [2]]
            assert next((tmp_path / "runs").glob(f"{run_id}-*/config.yaml"))
            supervisor.stop("trainer")
            supervisor.children = [c for c in supervisor.children if c.name != "trainer"]
    finally:
        supervisor.stop_all()
