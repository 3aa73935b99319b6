"""Run three updates of the trainer's engine on a fixed batch and write the losses and weights (rank 0).

Launched by `test_trainer_zero.py`, as one process (ZeRO-0) and under torchrun with two processes (ZeRO-2,
gloo): `python trainer_zero_worker.py MODEL_DIR STAGE OUT.json [ALGORITHM [MICRO_BATCH_TOKENS]]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cadence.config import RunConfig
from cadence.trainer.engine import TrainEngine
from cadence.trainer.update import Group, update

# Four prompts, one correct and one incorrect answer each → four pairs, two per rank with two ranks. The
# first prompt's answers are longer, so with a small token budget rank 0 needs more micro-batches than rank 1.
GROUPS = [Group(f"p{i}", "math", 0, [1, 5 + i, 6, 7], [[10 + i, 11, 2], [12, 13 + i, 2]], [1.0, 0.0]) for i in range(4)]
GROUPS[0].completions = [[10, 11, 12, 13, 14, 15, 2], [12, 13, 14, 15, 16, 17, 2]]
ALGORITHMS = {"dpo": {"type": "dpo"}, "grpo": {"type": "grpo", "aggregation": "seq_mean_token_sum"}}


def main() -> None:
    torch.set_num_threads(1)
    model_dir, stage, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    algorithm = sys.argv[4] if len(sys.argv) > 4 else "dpo"
    budget = int(sys.argv[5]) if len(sys.argv) > 5 else 8192
    config = RunConfig.model_validate(
        {
            "algorithm": ALGORITHMS[algorithm],
            "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
            "sampling": {"n": 2},
            "deepspeed": {"zero_stage": stage},
            "micro_batch_tokens": budget,
        }
    )
    engine = TrainEngine(model_dir, config)
    losses = [update(engine, GROUPS, step=0)["loss"] for _ in range(3)]
    weight = engine.full_state_dict()["model.layers.0.mlp.up_proj.weight"]
    if engine.is_main:
        out.write_text(
            json.dumps({"losses": losses, "world_size": engine.world_size, "weight": weight.flatten()[:64].tolist()})
        )
    engine.close()


if __name__ == "__main__":
    main()
