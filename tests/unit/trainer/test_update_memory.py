"""What keeps an update's memory flat over its micro-batches: nothing of a micro-batch outlives its backward,
and the gradient buffers outlive the step (bench/memory.py measures the peaks these keep flat)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from cadence.config import RunConfig
from cadence.trainer.engine import TrainEngine
from cadence.trainer.update import Group, update

torch.set_num_threads(1)

GROUPS = [
    Group("p0", "math", 0, [1, 5, 6, 7], [[10, 11, 2], [12, 2], [13, 14, 2], [15, 2]], [1.0, 0.0, 1.0, 0.0]),
    Group("p1", "math", 0, [1, 8, 9], [[16, 17, 2], [18, 2], [19, 2], [20, 21, 22, 2]], [0.0, 1.0, 0.0, 1.0]),
]
ALGORITHMS = [{"type": "dpo", "grpo_coef": 0.5}, {"type": "grpo"}]


def config(algorithm: dict, **overrides: object) -> RunConfig:
    base = {"algorithm": algorithm, "optimizer": {"lr": 1e-3}, "sampling": {"n": 4, "max_tokens": 6}}
    return RunConfig.model_validate(base | overrides)


class _Marker(torch.autograd.Function):
    """Identity on the policy's logits; its node (`ctx`) lives exactly as long as the forward's graph."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor) -> torch.Tensor:
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_micro_batch_graph_is_alive_at_the_next_forward(untrained_tiny_model_dir: Path, algorithm: dict) -> None:
    """A graph kept until the step (its loss tensor) fragments the heap between micro-batches: on
    SmolLM2-135M the process grew ~250 MiB a micro-batch while the live tensors did not."""
    engine = TrainEngine(untrained_tiny_model_dir, config(algorithm, micro_batch_tokens=16))
    graphs: list[weakref.ref] = []
    alive_at_forward: list[int] = []

    def mark(module: torch.nn.Module, args: Any, output: Any) -> Any:
        alive_at_forward.append(sum(ref() is not None for ref in graphs))
        output.logits = _Marker.apply(output.logits)
        graphs.append(weakref.ref(output.logits.grad_fn))
        return output

    handle = engine.module.register_forward_hook(mark)
    try:
        update(engine, GROUPS, step=0)
    finally:
        handle.remove()
    assert len(alive_at_forward) > 2  # one sequence per micro-batch: many forwards in one step
    assert alive_at_forward == [0] * len(alive_at_forward)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradient_buffers_outlive_the_step_zeroed(untrained_tiny_model_dir: Path, algorithm: dict) -> None:
    """Freed at every step, the buffers would be allocated inside the next step's first backward and held
    through its later forwards: the step's peak would depend on how many micro-batches it has."""
    engine = TrainEngine(untrained_tiny_model_dir, config(algorithm, micro_batch_tokens=16))
    params = [p for p in engine.module.parameters() if p.requires_grad]
    update(engine, GROUPS, step=0)
    buffers = [p.grad.data_ptr() for p in params]
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    update(engine, GROUPS, step=1)
    assert [p.grad.data_ptr() for p in params] == buffers
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
