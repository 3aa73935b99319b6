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
from cadence.trainer.batching import build_pairs, grpo_advantages
from cadence.trainer.engine import SequenceBatch, TokenStats, TrainEngine
from cadence.trainer.losses import LossOutput, combined_loss, dpo_loss, entropy_bonus, grpo_loss

TIS_CAP = 2.0
"""Truncation of importance weights for stale samples (async_lag > 0), Yao et al. 2025's C = 2."""


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
    """Loss on this rank's shard, backward, step (*collective*). Metrics averaged over ranks."""
    config = engine.config
    algo = config.algorithm
    dpo = grpo = None
    stats: TokenStats | None = None
    metrics: dict[str, float] = {}
    if isinstance(algo, DPOConfig):
        selection = build_pairs(
            [(g.task, g.rewards) for g in groups], random.Random(f"{config.seed}:{step}"), group=algo.group
        )
        metrics |= {"pairs_kept": len(selection.pairs), "pairs_skipped": selection.skipped_prompts}
        if selection.pairs:
            dpo, stats = _dpo_part(engine, groups, selection.pairs, algo)
    if config.uses_grpo:
        grpo, grpo_stats = _grpo_part(engine, groups)
        stats = stats or grpo_stats
    if stats is None:  # DPO and not one prompt with a pair: zero loss, no step (counted in pairs_skipped)
        return metrics | {"loss": 0.0, "skipped_update": 1.0}
    if grpo is None or isinstance(algo, GRPOConfig):
        loss = (dpo or grpo).loss  # type: ignore[union-attr]
    else:
        loss = combined_loss(dpo.loss if dpo else torch.zeros((), device=grpo.loss.device), grpo.loss, algo.grpo_coef)
    if config.entropy_coef > 0:
        loss = loss + entropy_bonus(stats.entropy, stats.mask, config.entropy_coef)
    grad_norm = engine.step(loss)
    for part in (dpo, grpo):
        metrics |= part.metrics if part is not None else {}
    tokens = stats.mask.sum().clamp(min=1)
    metrics |= {
        "loss": loss.item(),
        "entropy": ((stats.entropy.detach() * stats.mask).sum() / tokens).item(),
        "grad_norm": grad_norm,
        "lr": engine.lr(),
    }
    return _mean_over_ranks(metrics, engine.world_size)


def _shard(items: list, rank: int, world: int) -> tuple[list, bool]:
    """This rank's items; a rank left without any takes the first one at zero weight (ZeRO needs every
    rank in every forward/backward)."""
    mine = items[rank::world]
    return (mine, True) if mine else (items[:1], False)


def _dpo_part(engine: TrainEngine, groups: list[Group], pairs: list, algo: DPOConfig) -> tuple[LossOutput, TokenStats]:
    mine, weighted = _shard(pairs, engine.rank, engine.world_size)
    prompts = [groups[p.group].prompt_ids for p in mine] * 2
    completions = [groups[p.group].completions[p.chosen] for p in mine]
    completions += [groups[p.group].completions[p.rejected] for p in mine]
    batch = SequenceBatch.from_token_ids(prompts, completions, engine.pad_token_id)
    policy = engine.policy_stats(batch, entropy_grad=engine.config.entropy_coef > 0)
    ref = engine.reference_stats(batch)
    n = len(mine)
    seq, ref_seq, lengths = policy.sequence_logps(), ref.sequence_logps(), policy.lengths()
    out = dpo_loss(
        seq[:n],
        seq[n:],
        ref_seq[:n],
        ref_seq[n:],
        algo.beta,
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        length_normalize=algo.length_normalize,
        nll_coef=algo.nll_coef,
        pair_groups=torch.tensor([p.group for p in mine]) if algo.group else None,
    )
    return LossOutput(out.loss if weighted else out.loss * 0.0, out.metrics), policy


def _grpo_part(engine: TrainEngine, groups: list[Group]) -> tuple[LossOutput, TokenStats]:
    config = engine.config
    algo = config.algorithm
    std_normalize = isinstance(algo, GRPOConfig) and algo.std_normalize
    rows = []
    for g in groups:
        for i, advantage in enumerate(grpo_advantages(g.rewards, std_normalize=std_normalize)):
            rows.append((g, i, advantage))
    mine, weighted = _shard(rows, engine.rank, engine.world_size)
    batch = SequenceBatch.from_token_ids(
        [g.prompt_ids for g, _, _ in mine], [g.completions[i] for g, i, _ in mine], engine.pad_token_id
    )
    policy = engine.policy_stats(batch, entropy_grad=config.entropy_coef > 0)
    old, ref = engine.old_policy_stats(batch), engine.reference_stats(batch)
    behavior = _behavior_logps(mine, policy.mask) if engine.schedule.off_policy else None
    options = algo if isinstance(algo, GRPOConfig) else GRPOConfig()
    out = grpo_loss(
        policy.logps,
        old.logps,
        ref.logps,
        torch.tensor([a for _, _, a in mine], device=policy.logps.device),
        policy.mask,
        clip_eps=options.clip_eps,
        kl_beta=options.kl_beta,
        aggregation=options.aggregation,
        max_len=config.sampling.max_tokens,
        behavior_logps=behavior,
        tis_cap=TIS_CAP if behavior is not None else None,
    )
    return LossOutput(out.loss if weighted else out.loss * 0.0, out.metrics), policy


def _behavior_logps(rows: list, mask: torch.Tensor) -> torch.Tensor | None:
    """The generating worker's per-token log-probs placed on the completion positions; None when any
    sample lacks them (then the old-policy snapshot stands in for the behaviour policy)."""
    out = torch.zeros_like(mask)
    for row, (g, i, _) in enumerate(rows):
        values = g.behavior_logps[i] if i < len(g.behavior_logps) else []
        if len(values) != len(g.completions[i]):
            return None
        start = len(g.prompt_ids) - 1
        out[row, start : start + len(values)] = torch.tensor(values, dtype=mask.dtype)
    return out


def _mean_over_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: v / world_size for k, v in zip(keys, values.tolist(), strict=True)}
