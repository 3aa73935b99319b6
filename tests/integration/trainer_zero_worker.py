"""Run three DPO updates of the trainer's engine on a fixed batch and write the losses (rank 0).

Launched by `test_trainer_zero.py`, once as one process (ZeRO-0) and once under torchrun with two
processes (ZeRO-2, gloo): `python trainer_zero_worker.py MODEL_DIR STAGE OUT.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cadence.config import RunConfig
from cadence.trainer.engine import TrainEngine
from cadence.trainer.update import Group, update

# Four prompts, one correct and one incorrect answer each → four pairs, two per rank with two ranks.
GROUPS = [Group(f"p{i}", "math", 0, [1, 5 + i, 6, 7], [[10 + i, 11, 2], [12, 13 + i, 2]], [1.0, 0.0]) for i in range(4)]


def main() -> None:
    torch.set_num_threads(1)
    model_dir, stage, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    config = RunConfig.model_validate(
        {"optimizer": {"lr": 1e-3, "grad_clip": 1.0}, "sampling": {"n": 2}, "deepspeed": {"zero_stage": stage}}
    )
    engine = TrainEngine(model_dir, config)
    losses = [update(engine, GROUPS, step=0)["loss"] for _ in range(3)]
    if engine.is_main:
        out.write_text(json.dumps({"losses": losses, "world_size": engine.world_size}))
    engine.close()


if __name__ == "__main__":
    main()
