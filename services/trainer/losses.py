"""Training objectives as pure functions of tensors: DPO (and its variants), GRPO, entropy, DPO + α·GRPO.

Nothing here knows about models, streams or DeepSpeed: the loop computes log-probs, picks pairs or
advantages (`cadence.trainer.batching`) and hands tensors to these functions. Each function cites the
paper it implements; the defaults are the ones of "Bridging Offline and Online Reinforcement Learning
for LLMs" (Lanchantin et al., 2025, https://arxiv.org/abs/2506.21495), the paper Cadence reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["grpo", "bnpo", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo")


@dataclass
class LossOutput:
    """A differentiable scalar `loss` and detached scalar `metrics` (plain floats, ready for JSON)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _mean_per_group(values: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values`; with `groups` (one id per element) first within each group, then over groups."""
    if groups is None:
        return values.mean()
    _, inverse = torch.unique(groups, return_inverse=True)
    count = int(inverse.max().item()) + 1
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, inverse, values)
    sizes = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, inverse, torch.ones_like(values))
    return (sums / sizes).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    length_normalize: bool = False,
    nll_coef: float = 0.0,
    pair_groups: torch.Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO on sequence-level log-probs, with the length-normalised, +NLL and GroupDPO variants.

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
    (2023, https://arxiv.org/abs/2305.18290). The policy's implicit reward of a response is
    `β·(log π(y|x) − log π_ref(y|x))`; the loss `−log σ(r_chosen − r_rejected)` pushes the chosen
    response's implicit reward above the rejected one's. Near the start (policy = reference) every margin
    is 0 and the loss is log 2 ≈ 0.693; it falls as the margin grows and its gradient fades once the
    margin is a few multiples of 1/β. A small β (0.01, the paper's choice for reward-model rewards) lets
    the policy drift far from the reference; a large one (0.1 for verifiable rewards) keeps it close.

    Variants (each off by default):
    - `length_normalize`: log-probs are divided by the response length (SimPO-style average, Meng et al.
      2024, https://arxiv.org/abs/2405.14734) so long answers are not favoured just for having more tokens.
    - `nll_coef`: adds `coef · NLL(chosen) / length` as in Iterative RPO (Pang et al. 2024,
      https://arxiv.org/abs/2404.19733), which keeps the chosen answers' likelihood from falling.
    - `pair_groups`: one prompt id per pair; the loss is the mean over each prompt's pairs, then over
      prompts (GroupDPO: every correct × incorrect pair of a prompt counts, every prompt weighs the same).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed token log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model (no gradient).
        beta: KL strength, typically 0.01–0.5.
        chosen_lengths, rejected_lengths: [B] response token counts; needed by `length_normalize` and NLL.
        length_normalize: average instead of sum the log-probs.
        nll_coef: weight of the NLL term on chosen responses (0 turns it off; ~1 in Iterative RPO).
        pair_groups: [B] prompt ids for GroupDPO averaging.

    Returns:
        `LossOutput` with the mean loss and metrics `chosen_rewards`, `rejected_rewards`, `margin`
        (mean implicit-reward margin), `reward_accuracy` (share of pairs with a positive margin),
        `chosen_logps`, `rejected_logps` (policy, as given) and `nll`.
    """
    if policy_chosen_logps.numel() == 0:
        raise ValueError("dpo_loss needs at least one pair; the loop skips batches without pairs")
    needs_lengths = length_normalize or nll_coef > 0
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("length_normalize and nll_coef need chosen_lengths and rejected_lengths")
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if length_normalize:
        assert chosen_lengths is not None and rejected_lengths is not None
        cl, rl = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        pc, pr, rc, rr = pc / cl, pr / rl, rc / cl, rr / rl
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    margins = chosen_rewards - rejected_rewards
    per_pair = -F.logsigmoid(margins)
    nll = torch.zeros((), dtype=per_pair.dtype, device=per_pair.device)
    if nll_coef > 0:
        assert chosen_lengths is not None
        per_pair_nll = -policy_chosen_logps / chosen_lengths.clamp(min=1)
        per_pair = per_pair + nll_coef * per_pair_nll
        nll = per_pair_nll.detach().mean()
    loss = _mean_per_group(per_pair, pair_groups)
    metrics = {
        "chosen_rewards": chosen_rewards.detach().mean().item(),
        "rejected_rewards": rejected_rewards.detach().mean().item(),
        "margin": margins.detach().mean().item(),
        "reward_accuracy": (margins.detach() > 0).float().mean().item(),
        "chosen_logps": policy_chosen_logps.detach().mean().item(),
        "rejected_logps": policy_rejected_logps.detach().mean().item(),
        "nll": nll.item(),
    }
    return LossOutput(loss, metrics)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate `exp(ref − logp) − (ref − logp) − 1` (Schulman's k3).

    J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html), used by
    GRPO (Shao et al. 2024). With `d = ref − logp` on a token sampled from π, `E[exp(d)] = 1`, so
    `exp(d) − d − 1` is unbiased for KL(π‖π_ref), never negative, and has low variance when π ≈ π_ref.
    """
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate_tokens(
    token_losses: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, max_len: int | None = None
) -> torch.Tensor:
    """Reduce [B, T] token losses to a scalar: `grpo`, `bnpo` or `dr_grpo` (see `grpo_loss`)."""
    mask = mask.to(token_losses.dtype)
    if aggregation == "grpo":
        per_seq = (token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.mean()
    if aggregation == "bnpo":
        return (token_losses * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        length = max_len if max_len is not None else mask.shape[-1]
        return (token_losses * mask).sum() / (mask.shape[0] * length)
    raise ValueError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    kl_beta: float = 0.001,
    aggregation: Aggregation = "dr_grpo",
    max_len: int | None = None,
    behavior_logps: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> LossOutput:
    """Token-level PPO-clipped policy gradient with a k3 KL penalty: GRPO and its aggregations.

    Shao et al., "DeepSeekMath" (2024, https://arxiv.org/abs/2402.03300) introduced GRPO: the advantage
    of a sample is its reward relative to the other samples of the same prompt, shared by all its tokens;
    the PPO clip (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) stops the ratio
    `π/π_old` from moving more than `clip_eps` in the advantage's direction; a k3 KL term keeps π near
    π_ref. Per token: `−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·k3`.

    Aggregation of the [B, T] token losses:
    - `grpo`: mean over each sequence's tokens, then over sequences (the original; short answers weigh more
      per token, which biases towards short correct and long wrong answers);
    - `bnpo`: mean over all tokens of the batch;
    - `dr_grpo`: sum over tokens ÷ (B × max completion length), Liu et al., "Understanding R1-Zero-Like
      Training" (2025, https://arxiv.org/abs/2503.20783): no length normalisation (the paper's choice).

    Truncated importance sampling (Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training", 2025): when a sample was generated by an older `behavior` policy than `old` (only with
    `async_lag` > 0), each token is weighted by `min(exp(old − behavior), tis_cap)`, detached.

    Args:
        logps: [B, T] token log-probs under the policy being trained.
        old_logps: [B, T] under the snapshot of the last sync (the generating weights when async_lag = 0).
        ref_logps: [B, T] under the reference model.
        advantages: [B] one advantage per sequence (`batching.grpo_advantages`).
        mask: [B, T] 1 on completion tokens, 0 on padding.
        clip_eps: PPO clip range, typically 0.1–0.3.
        kl_beta: KL weight; the paper uses 0.001.
        aggregation: `grpo`, `bnpo` or `dr_grpo`.
        max_len: the constant of `dr_grpo` (the sampling `max_tokens`); default: T.
        behavior_logps, tis_cap: enable truncated importance weights (both or neither).

    Returns:
        `LossOutput` with the loss and metrics `kl` (mean k3 per token), `clip_fraction` (share of tokens
        whose clipped term won the min, i.e. got no policy gradient), `ratio_mean` and `tis_weight_mean`.
    """
    if (behavior_logps is None) != (tis_cap is None):
        raise ValueError("truncated importance sampling needs both behavior_logps and tis_cap")
    mask_f = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    policy_term = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logps, ref_logps)
    weights = torch.ones_like(logps)
    if behavior_logps is not None:
        weights = torch.exp(old_logps - behavior_logps).clamp(max=tis_cap).detach()
    token_losses = weights * policy_term + kl_beta * kl
    loss = aggregate_tokens(token_losses, mask, aggregation, max_len)
    tokens = mask_f.sum().clamp(min=1)
    metrics = {
        "kl": ((kl.detach() * mask_f).sum() / tokens).item(),
        "clip_fraction": (((clipped.detach() < unclipped.detach()).to(logps.dtype) * mask_f).sum() / tokens).item(),
        "ratio_mean": ((ratio.detach() * mask_f).sum() / tokens).item(),
        "tis_weight_mean": ((weights * mask_f).sum() / tokens).item(),
    }
    return LossOutput(loss, metrics)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy `−Σ p log p` of each position's next-token distribution: [B, T, V] → [B, T]."""
    return entropy_of(torch.log_softmax(logits.float(), dim=-1))


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """`token_entropy` from log-probabilities already computed (saves a second log-softmax over the vocabulary)."""
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """`−coef · mean token entropy` over completion tokens, added to the loss to slow entropy collapse.

    Entropy regularisation (Williams & Peng 1991; Mnih et al. 2016, https://arxiv.org/abs/1602.01783):
    RL on LLMs tends to sharpen the policy until it samples one answer (entropy → 0), which ends
    exploration — the paper reports entropy and length collapse for DPO. Rewarding entropy counteracts
    it. Takes the per-token entropies (`token_entropy`, computed next to the log-probs so the [B, T, V]
    logits need not be kept) and the [B, T] completion mask.
    """
    mask_f = mask.to(entropy.dtype)
    return -coef * (entropy * mask_f).sum() / mask_f.sum().clamp(min=1)


def combined_loss(dpo: torch.Tensor, grpo: torch.Tensor, alpha: float) -> torch.Tensor:
    """DPO + α·GRPO on the same samples: a Cadence variant (DESIGN.md §5) beyond the paper's main runs.

    Lanchantin et al. (2025) find DPO and GRPO reach similar results with different dynamics: DPO's
    pairwise signal only sees the best and worst sample of a prompt, GRPO's group-relative signal uses
    every sample. Adding them lets GRPO's per-sample signal regularise DPO; α (≈0.1–1) sets its share.
    """
    return dpo + alpha * grpo
