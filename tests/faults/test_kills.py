"""SIGKILL each service of a real local run at chosen moments, restart it, and audit the run.

`make test` runs a few representative faults (about a minute each on 2 cores); the whole matrix, several
moments per service, is marked slow (`make test-slow`). Each run: 16 online steps (s = 1) × 4 prompts × 8
samples with the tiny model and the hf engine, unless the fault says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Fault, audit, start_run

from cadence.app.launcher import ServiceFailed

# Mid-stage moments are caught by polling, so their runs are longer: with 16 steps of ~0.2 s a run can end
# while `start` still waits for the last health check, and the moment never comes.
LONGER = {"steps": 48}
FAST = [
    Fault("inference0", "mid-generation", overrides=LONGER),
    Fault("trainer", "step2", overrides={"checkpoint_every": 2}),
    Fault("redis", "step2"),
]
SLOW = [
    Fault("inference0", "step1"),
    Fault("inference0", "step4", overrides={"sync_every": 2}),
    Fault("reward", "mid-scoring", overrides=LONGER),
    Fault("reward", "step4"),
    Fault("broker", "step1"),
    Fault("broker", "step4", overrides={"sync_every": 2}),
    Fault("broker", "step2", action="freeze", down_seconds=5.0),
    Fault("trainer", "step1", overrides={"checkpoint_every": 0}),  # no checkpoint yet: replays from step 0
    Fault("trainer", "step6", overrides={"checkpoint_every": 3, "sync_every": 2}),
    Fault("redis", "mid-generation", overrides=LONGER),
    Fault("redis", "mid-scoring", overrides=LONGER),
    Fault("redis", "step8", down_seconds=3.0),
]


def run_with(fault: Fault, tmp_path: Path, model_dir: Path) -> dict:
    run = start_run(tmp_path, model_dir, fault.overrides)
    try:
        run.inject(fault)
        run.finish()
        summary = audit(run)
    finally:
        run.stop()
    print(fault.id, summary)
    return summary


@pytest.mark.parametrize("fault", FAST, ids=lambda f: f.id)
def test_a_killed_service_is_restarted_and_the_run_is_exactly_once(
    fault: Fault, tmp_path: Path, tiny_model_dir: Path
) -> None:
    run_with(fault, tmp_path, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("fault", SLOW, ids=lambda f: f.id)
def test_fault_matrix(fault: Fault, tmp_path: Path, tiny_model_dir: Path) -> None:
    run_with(fault, tmp_path, tiny_model_dir)


def test_redis_losing_its_data_fails_the_run_loudly(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Redis back without persistence (empty): the trainer notices its run's data vanished and exits with a
    message naming the fix, instead of waiting forever for samples that no longer exist."""
    run = start_run(tmp_path, tiny_model_dir)
    try:
        run.inject(Fault("redis", "step2", action="wipe"))
        with pytest.raises(ServiceFailed, match="appendonly") as failure:
            run.finish(timeout=90)
        assert failure.value.child.name == "trainer"
        assert "Redis lost run" in failure.value.child.tail(40)
    finally:
        run.stop()
