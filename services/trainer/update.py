"""One optimizer update from a batch of scored groups, and the plan every rank executes in lockstep.

Rank 0 reads the streams and decides (`StepPlan`); every rank runs `execute(plan)`: the update on its
shard of the pairs/samples, the weight gather at sync points, checkpoints and the final save, all of
which are collective under DeepSpeed. With one process the broadcast is skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cadence.config import DPOConfig, GRPOConfig
from cadence.trainer.batching import Pair, build_pairs, grpo_advantages
from cadence.trainer.engine import TrainEngine
from cadence.trainer.objectives import DPOPart, EntropyBonus, GRPOPart, MicroResult, PairItem, RolloutItem, plan


@dataclass
class Group:
    """One prompt's scored samples, as token ids."""

    prompt_id: str
    task: str
    version: int
    prompt_ids: list[int]
    completions: list[list[int]]
    rewards: list[float]
    behavior_logps: list[list[float]] = field(default_factory=list)


@dataclass
class StepPlan:
    """What every rank does next. `groups` empty: no update (a stop, a checkpoint or the final save)."""

    step: int
    groups: list[Group] = field(default_factory=list)
    sync_reference: bool = False
    sync_old_policy: bool = False
    gather: bool = False
    checkpoint: dict[str, Any] | None = None
    save_final: bool = False
    stop: bool = False


def broadcast_plan(plan: StepPlan | None, world_size: int) -> StepPlan | None:
    """Rank 0's plan on every rank (followers pass None)."""
    if world_size == 1:
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def execute(engine: TrainEngine, tokenizer: Any, plan: StepPlan, run_dir: Path) -> tuple[dict, dict | None]:
    """Run a plan on this rank (*collective*). Returns metrics and, when gathered, the full state dict."""
    metrics = update(engine, plan.groups, plan.step) if plan.groups else {}
    state = None
    if plan.gather or plan.sync_reference or plan.sync_old_policy:
        state = engine.full_state_dict()
        if plan.sync_reference:
            engine.sync_reference(state)
        if plan.sync_old_policy:
            engine.sync_old_policy(state)
    if plan.checkpoint is not None:
        engine.save_checkpoint(run_dir / "checkpoints", f"step-{plan.step}", {"cadence": plan.checkpoint})
    if plan.save_final:
        engine.save_pretrained(run_dir / "final", tokenizer)
    return metrics, state


def follow(engine: TrainEngine, tokenizer: Any, run_dir: Path) -> None:
    """Ranks > 0: restore the checkpoint rank 0 restores, then execute rank 0's plans until it says stop."""
    engine.load_checkpoint(run_dir / "checkpoints")
    while True:
        plan = broadcast_plan(None, engine.world_size)
        if plan is None or plan.stop:
            return
        execute(engine, tokenizer, plan, run_dir)


def update(engine: TrainEngine, groups: list[Group], step: int) -> dict[str, float]:
    """Loss on this rank's shard in micro-batches, a backward for each, one step (*collective*).

    The shard is cut into micro-batches of at most `micro_batch_tokens` padded tokens whose losses add up
    to the shard's (`cadence.trainer.objectives`), so the step equals the one-shot update. Metrics are
    averaged over ranks.
    """
    config = engine.config
    algo = config.algorithm
    metrics: dict[str, float] = {}
    parts: list[DPOPart | GRPOPart] = []
    entropy = EntropyBonus(config.entropy_coef, config.entropy_reduction)
    if isinstance(algo, DPOConfig):
        selection = build_pairs(
            [(g.task, g.rewards) for g in groups], random.Random(f"{config.seed}:{step}"), group=algo.group
        )
        metrics |= {"pairs_kept": len(selection.pairs), "pairs_skipped": selection.skipped_prompts}
        if selection.pairs:
            parts.append(_dpo_part(engine, groups, selection.pairs, algo, entropy))
    if config.uses_grpo:  # the entropy bonus rides on the first part only: DPO's sequences when it has pairs
        parts.append(_grpo_part(engine, groups, EntropyBonus(0.0, entropy.reduction) if parts else entropy))
    if not parts:  # DPO and not one prompt with a pair: zero loss, no step (counted in pairs_skipped)
        return metrics | {"loss": 0.0, "skipped_update": 1.0}
    runs = plan(parts, config.micro_batch_tokens, engine)
    results: dict[int, list[MicroResult]] = {id(part): [] for part in parts}
    for number, (part, items, padding) in enumerate(runs):
        results[id(part)].append(_forward_backward(engine, part, items, padding, last=number == len(runs) - 1))
    loss = sum(r.loss.item() for kept in results.values() for r in kept)
    grad_norm = engine.step()
    for part in parts:
        metrics |= _weighted_metrics(results[id(part)])
    first = results[id(parts[0])]
    tokens = max(sum(r.tokens for r in first), 1.0)
    metrics |= {"loss": loss, "entropy": sum(r.entropy_sum for r in first) / tokens, "grad_norm": grad_norm}
    metrics["lr"] = engine.lr()
    return _mean_over_ranks(metrics, engine)


def _forward_backward(
    engine: TrainEngine, part: DPOPart | GRPOPart, items: list[int], padding: bool, *, last: bool
) -> MicroResult:
    """One micro-batch's loss and backward; its result comes back with the loss detached.

    A loss tensor kept until the step keeps its micro-batch's autograd graph alive: backward frees the
    graph's saved tensors but not its nodes (~2 MiB of small allocations for SmolLM2-135M), which sit
    between the freed activations on the heap, so the next micro-batch's activations no longer fit there:
    the process grew by ~250 MiB a micro-batch (2 × 288 tokens, glibc) while the live tensors did not.
    """
    result = part.run(items, padding=padding)
    engine.backward(result.loss, last=last)
    result.loss = result.loss.detach()
    return result


def _weighted_metrics(results: list[MicroResult]) -> dict[str, float]:
    """A part's metrics over its micro-batches, each weighted by the pairs or tokens behind it."""
    real = [r for r in results if r.weight > 0]
    if not real:
        return dict(results[0].metrics)
    total = sum(r.weight for r in real)
    return {key: sum(r.metrics[key] * r.weight for r in real) / total for key in real[0].metrics}


def _shard(items: list, rank: int, world: int) -> tuple[list, bool]:
    """This rank's items; a rank left without any takes the first one at zero weight (ZeRO needs every
    rank in every forward/backward)."""
    mine = items[rank::world]
    return (mine, True) if mine else (items[:1], False)


def _dpo_part(
    engine: TrainEngine, groups: list[Group], pairs: list[Pair], algo: DPOConfig, entropy: EntropyBonus
) -> DPOPart:
    mine, weighted = _shard(pairs, engine.rank, engine.world_size)
    items = [
        PairItem(
            groups[p.group].prompt_ids,
            groups[p.group].completions[p.chosen],
            groups[p.group].completions[p.rejected],
            p.group,
        )
        for p in mine
    ]
    return DPOPart(engine, items, algo, weighted=weighted, entropy=entropy)


def _grpo_part(engine: TrainEngine, groups: list[Group], entropy: EntropyBonus) -> GRPOPart:
    algo = engine.config.algorithm
    std_normalize = isinstance(algo, GRPOConfig) and algo.std_normalize
    rows = []
    for index, g in enumerate(groups):
        for i, advantage in enumerate(grpo_advantages(g.rewards, std_normalize=std_normalize)):
            behavior = g.behavior_logps[i] if i < len(g.behavior_logps) else None
            rows.append(RolloutItem(g.prompt_ids, g.completions[i], advantage, index, behavior))
    mine, weighted = _shard(rows, engine.rank, engine.world_size)
    # DPO + α·GRPO (a Cadence variant, DESIGN.md §5): GRPO's per-sample signal regularises DPO's pairwise one.
    options, coef = (algo, 1.0) if isinstance(algo, GRPOConfig) else (GRPOConfig(), algo.grpo_coef)
    return GRPOPart(engine, mine, options, coef=coef, weighted=weighted, entropy=entropy)


def _mean_over_ranks(metrics: dict[str, float], engine: TrainEngine) -> dict[str, float]:
    if engine.world_size == 1:
        return metrics
    keys = sorted(metrics)
    # On the engine's device: NCCL, DeepSpeed's backend on GPUs, reduces only CUDA tensors.
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=engine.device)
    dist.all_reduce(values)
    return {k: v / engine.world_size for k, v in zip(keys, values.tolist(), strict=True)}
