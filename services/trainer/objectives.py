"""The update's objectives on one rank's shard — DPO pairs, GRPO rollouts — run in micro-batches.

A part holds this rank's items and the normalisers of the whole shard (pair weights, sequence weights,
entropy weights). Each micro-batch's loss uses its slice of those, so the micro-batch losses, each
backpropagated on its own, add up to the shard's loss in one pass: the same gradient, with the memory of
one micro-batch (`micro_batch_tokens` padded tokens). `plan` cuts the parts into micro-batches and gives
every rank the same number of passes (ZeRO ≥ 2 reduces gradients inside each backward, ZeRO-3 gathers
weights inside each forward: a rank with fewer passes would leave its peers waiting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cadence.config import DPOConfig, GRPOConfig
from cadence.trainer.batching import micro_batches
from cadence.trainer.engine import SequenceBatch, TokenStats, TrainEngine
from cadence.trainer.losses import (
    EntropyReduction,
    dpo_loss,
    entropy_bonus,
    entropy_weights,
    group_weights,
    grpo_loss,
    sequence_weights,
)

TIS_CAP = 2.0
"""Truncation of importance weights for stale samples (async_lag > 0), Yao et al. 2025's C = 2."""


@dataclass(frozen=True)
class PairItem:
    """One DPO pair as token ids; `group` is its prompt's index in the batch (GroupDPO averaging)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    group: int


@dataclass(frozen=True)
class RolloutItem:
    """One GRPO rollout as token ids, its advantage and, if the worker sent them, its behaviour log-probs."""

    prompt: list[int]
    completion: list[int]
    advantage: float
    group: int
    behavior_logps: list[float] | None = None


@dataclass
class MicroResult:
    """One micro-batch: its share of the step loss and what its metrics are averaged by."""

    loss: torch.Tensor
    metrics: dict[str, float]
    weight: float
    """Pairs (DPO) or completion tokens (GRPO) behind `metrics`; 0 for a padding pass."""
    entropy_sum: float
    tokens: float


@dataclass
class EntropyBonus:
    """The entropy bonus a part carries (only the first part of a step: DPO's sequences when it has pairs)."""

    coef: float
    reduction: EntropyReduction


class _Part:
    per_item = 1
    lengths: list[int]

    def __init__(self, engine: TrainEngine, weighted: bool, entropy: EntropyBonus) -> None:
        self.engine, self.scale, self.entropy = engine, 1.0 if weighted else 0.0, entropy

    def micro_batches(self, budget: int) -> list[list[int]]:
        return micro_batches(self.lengths, budget, self.per_item)

    def _entropy_weights(self, completion_lengths: Sequence[int], prompts: int) -> torch.Tensor:
        lengths = torch.tensor(list(completion_lengths), dtype=torch.float32)
        return entropy_weights(self.entropy.reduction, lengths, prompts).to(self.engine.device)

    def _finish(
        self, loss: torch.Tensor, stats: TokenStats, weights: torch.Tensor, metrics: dict, weight: float, padding: bool
    ) -> MicroResult:
        if self.entropy.coef > 0:
            loss = loss + entropy_bonus(stats.entropy, stats.mask, self.entropy.coef, weights)
        tokens = float(stats.mask.sum().item())
        entropy_sum = float((stats.entropy.detach() * stats.mask).sum().item())
        if padding:
            return MicroResult(loss * 0.0, metrics, 0.0, 0.0, 0.0)
        return MicroResult(loss * self.scale, metrics, weight, entropy_sum, tokens)


class DPOPart(_Part):
    """This rank's DPO pairs; a micro-batch is whole pairs (chosen and rejected side by side)."""

    per_item = 2

    def __init__(
        self, engine: TrainEngine, items: list[PairItem], algo: DPOConfig, *, weighted: bool, entropy: EntropyBonus
    ) -> None:
        super().__init__(engine, weighted, entropy)
        self.items, self.algo = items, algo
        self.lengths = [len(i.prompt) + max(len(i.chosen), len(i.rejected)) for i in items]
        groups = [i.group for i in items]
        n, device = len(items), engine.device
        self.pair_weights = group_weights(groups, device) if algo.group else torch.full((n,), 1.0 / n, device=device)
        completions = [len(i.chosen) for i in items] + [len(i.rejected) for i in items]
        self.entropy_weights = self._entropy_weights(completions, len(set(groups)))

    def run(self, idx: list[int], padding: bool = False) -> MicroResult:
        chosen = [self.items[i] for i in idx]
        completions = [i.chosen for i in chosen] + [i.rejected for i in chosen]
        batch = SequenceBatch.from_token_ids([i.prompt for i in chosen] * 2, completions, self.engine.pad_token_id)
        policy = self.engine.policy_stats(batch, entropy_grad=self.entropy.coef > 0)
        ref = self.engine.reference_stats(batch)
        k, index = len(idx), torch.tensor(idx, device=self.engine.device)
        seq, ref_seq, lengths = policy.sequence_logps(), ref.sequence_logps(), policy.lengths()
        out = dpo_loss(
            seq[:k],
            seq[k:],
            ref_seq[:k],
            ref_seq[k:],
            self.algo.beta,
            chosen_lengths=lengths[:k],
            rejected_lengths=lengths[k:],
            length_normalize=self.algo.length_normalize,
            nll_coef=self.algo.nll_coef,
            nll_reduction=self.algo.nll_reduction,
            pair_weights=self.pair_weights[index],
        )
        weights = self.entropy_weights[torch.cat([index, index + len(self.items)])]
        return self._finish(out.loss, policy, weights, out.metrics, float(k), padding)


class GRPOPart(_Part):
    """This rank's GRPO rollouts, their loss scaled by `coef` (1, or α of DPO + α·GRPO)."""

    def __init__(
        self,
        engine: TrainEngine,
        items: list[RolloutItem],
        options: GRPOConfig,
        *,
        coef: float,
        weighted: bool,
        entropy: EntropyBonus,
    ) -> None:
        super().__init__(engine, weighted, entropy)
        self.items, self.options, self.coef = items, options, coef
        self.lengths = [len(i.prompt) + len(i.completion) for i in items]
        completions = torch.tensor([len(i.completion) for i in items], dtype=torch.float32)
        max_len = engine.config.sampling.max_tokens
        self.seq_weights = sequence_weights(options.aggregation, completions, max_len).to(engine.device)
        self.entropy_weights = self._entropy_weights(completions.int().tolist(), len({i.group for i in items}))
        # Behaviour log-probs for every rollout of the shard, or for none (then π_old stands in for them).
        complete = all(i.behavior_logps is not None and len(i.behavior_logps) == len(i.completion) for i in items)
        self.off_policy = engine.schedule.off_policy and complete

    def run(self, idx: list[int], padding: bool = False) -> MicroResult:
        rows = [self.items[i] for i in idx]
        batch = SequenceBatch.from_token_ids(
            [r.prompt for r in rows], [r.completion for r in rows], self.engine.pad_token_id
        )
        policy = self.engine.policy_stats(batch, entropy_grad=self.entropy.coef > 0)
        old, ref = self.engine.old_policy_stats(batch), self.engine.reference_stats(batch)
        behavior = _behavior_logps(rows, policy.mask) if self.off_policy else None
        index = torch.tensor(idx, device=self.engine.device)
        out = grpo_loss(
            policy.logps,
            old.logps,
            ref.logps,
            torch.tensor([r.advantage for r in rows], device=policy.logps.device),
            policy.mask,
            clip_eps=self.options.clip_eps,
            kl_beta=self.options.kl_beta,
            aggregation=self.options.aggregation,
            max_len=self.engine.config.sampling.max_tokens,
            behavior_logps=behavior,
            tis_cap=TIS_CAP if behavior is not None else None,
            seq_weights=self.seq_weights[index],
        )
        tokens = float(policy.mask.sum().item())
        return self._finish(out.loss * self.coef, policy, self.entropy_weights[index], out.metrics, tokens, padding)


def _behavior_logps(rows: list[RolloutItem], mask: torch.Tensor) -> torch.Tensor:
    """The generating worker's per-token log-probs placed on the completion positions."""
    out = torch.zeros_like(mask)
    for row, item in enumerate(rows):
        start = len(item.prompt) - 1
        out[row, start : start + len(item.completion)] = torch.tensor(item.behavior_logps, dtype=mask.dtype)
    return out


def plan(parts: list[_Part], budget: int, engine: TrainEngine) -> list[tuple[_Part, list[int], bool]]:
    """(part, item indices, is padding) for every pass of the step, the same count on every rank (*collective*).

    A rank with fewer micro-batches than its busiest peer repeats its shortest item at zero weight."""
    runs: list[tuple[_Part, list[int], bool]] = []
    for part in parts:
        chunks = part.micro_batches(budget)
        count = _max_over_ranks(len(chunks), engine)
        runs += [(part, chunk, False) for chunk in chunks]
        runs += [(part, chunks[0][:1], True)] * (count - len(chunks))
    return runs


def _max_over_ranks(value: int, engine: TrainEngine) -> int:
    if engine.world_size == 1:
        return value
    box = torch.tensor([value], dtype=torch.long, device=engine.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())
