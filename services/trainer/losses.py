"""Training objectives as pure functions of tensors: DPO (and its variants), GRPO, the entropy bonus.

Nothing here knows about models, streams or DeepSpeed: the loop computes log-probs, picks pairs or
advantages (`cadence.trainer.batching`) and hands tensors to these functions. Each function cites the
paper it implements; the defaults are the ones of "Bridging Offline and Online Reinforcement Learning
for LLMs" (Lanchantin et al., 2025, https://arxiv.org/abs/2506.21495), the paper Cadence reproduces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["grpo", "bnpo", "dr_grpo", "seq_mean_token_sum"]
AGGREGATIONS: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "seq_mean_token_sum")
NllReduction = Literal["token_mean", "sequence_sum"]
EntropyReduction = Literal["token_mean", "rollout_sum"]


@dataclass
class LossOutput:
    """A differentiable scalar `loss` and detached scalar `metrics` (plain floats, ready for JSON)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def group_weights(
    groups: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Each element's weight in a mean within its group, then over groups (GroupDPO); sums to 1.

    Built from plain ids straight on `device` (the logits' device): a weight tensor on another device than
    the per-pair losses cannot be combined with them.
    """
    sizes = Counter(groups)
    return torch.tensor([1.0 / (len(sizes) * sizes[g]) for g in groups], dtype=dtype, device=device)


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
    nll_reduction: NllReduction = "token_mean",
    pair_weights: torch.Tensor | None = None,
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
    - `nll_coef`: adds an NLL term on the chosen response as in Iterative RPO (Pang et al. 2024,
      https://arxiv.org/abs/2404.19733), which keeps the chosen answers' likelihood from falling.
      `nll_reduction` `token_mean` (Cadence's default): `coef · NLL(chosen) / length`; `sequence_sum`
      (the paper's code, fairseq2's online DPO): `coef · NLL(chosen)` summed over the response's tokens, so
      a coefficient tuned for one does not carry over to the other (they differ by the response length).
    - `pair_weights`: each pair's weight in the loss (default 1/B, the mean); `group_weights` of the pairs'
      prompt ids gives GroupDPO (every correct × incorrect pair of a prompt counts, every prompt weighs the
      same). A micro-batch passes its slice of the whole batch's weights, so micro-batch losses add up to
      the batch loss.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed token log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model (no gradient).
        beta: KL strength, typically 0.01–0.5.
        chosen_lengths, rejected_lengths: [B] response token counts; needed by `length_normalize` and NLL.
        length_normalize: average instead of sum the log-probs.
        nll_coef: weight of the NLL term on chosen responses (0 turns it off; ~1 in Iterative RPO).
        nll_reduction: `token_mean` or `sequence_sum` (the paper's), see above.
        pair_weights: [B] weights of the pairs in the loss, on the log-probs' device (moved there if not).

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
        per_pair_nll = -policy_chosen_logps
        if nll_reduction == "token_mean":
            per_pair_nll = per_pair_nll / chosen_lengths.clamp(min=1)
        per_pair = per_pair + nll_coef * per_pair_nll
        nll = per_pair_nll.detach().mean()
    if pair_weights is None:
        loss = per_pair.mean()
    else:
        loss = (per_pair * pair_weights.to(per_pair.device, per_pair.dtype)).sum()
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


def sequence_weights(aggregation: Aggregation, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """[B] weights `w` with `aggregate_tokens(...) = Σ_i w_i · Σ_t loss_it` for completion lengths [B].

    Computed once for a whole batch, they let micro-batches add up to the batch loss exactly: each
    micro-batch sums its sequences' token losses times its slice of `w`.
    """
    n = lengths.shape[0]
    lengths = lengths.to(torch.float32)
    if aggregation == "grpo":
        return 1.0 / (n * lengths.clamp(min=1))
    if aggregation == "bnpo":
        return torch.full_like(lengths, 1.0) / lengths.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        if max_len is None:
            raise ValueError("dr_grpo divides by B × max_len: pass max_len (the sampling max_tokens)")
        return torch.full_like(lengths, 1.0 / (n * max_len))
    if aggregation == "seq_mean_token_sum":
        return torch.full_like(lengths, 1.0 / n)
    raise ValueError(f"unknown aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


def aggregate_tokens(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    max_len: int | None = None,
    seq_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce [B, T] token losses to a scalar (see `grpo_loss` for each aggregation); `seq_weights`, a
    micro-batch's slice of the whole batch's `sequence_weights`, replaces the weights of this batch alone."""
    mask = mask.to(token_losses.dtype)
    if seq_weights is None:
        seq_weights = sequence_weights(aggregation, mask.sum(-1), max_len if max_len is not None else mask.shape[-1])
    per_seq = (token_losses * mask).sum(-1)
    return (per_seq * seq_weights.to(per_seq.device, per_seq.dtype)).sum()


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
    seq_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Token-level PPO-clipped policy gradient with a k3 KL penalty: GRPO and its aggregations.

    Shao et al., "DeepSeekMath" (2024, https://arxiv.org/abs/2402.03300) introduced GRPO: the advantage
    of a sample is its reward relative to the other samples of the same prompt, shared by all its tokens;
    the PPO clip (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) stops the ratio
    `π/π_old` from moving more than `clip_eps` in the advantage's direction; a k3 KL term keeps π near
    π_ref. Per token: `−min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·k3`.

    Aggregation of the [B, T] token losses (`grpo`, `bnpo`, `dr_grpo` exactly as TRL's `loss_type`):
    - `grpo`: mean over each sequence's tokens, then over sequences (the original; short answers weigh more
      per token, which biases towards short correct and long wrong answers);
    - `bnpo`: mean over all tokens of the batch;
    - `dr_grpo`: sum over tokens ÷ (B × max completion length), Liu et al., "Understanding R1-Zero-Like
      Training" (2025, https://arxiv.org/abs/2503.20783): no length normalisation, but a constant that
      scales the loss by 1/max_tokens;
    - `seq_mean_token_sum`: sum over each rollout's tokens, mean over rollouts — the paper's reduction
      (Lanchantin et al. 2025, no length normalisation; fairseq2's online GRPO with
      `length_normalization` off; verl's `seq-mean-token-sum`). It is `dr_grpo` × max_tokens: with Adam in
      its ε-dominated regime (ε 1e-4, clip 0.1) that scale changes the update, so the paper configs use this.

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
        aggregation: `grpo`, `bnpo`, `dr_grpo` or `seq_mean_token_sum` (the paper's).
        max_len: the constant of `dr_grpo` (the sampling `max_tokens`); default: T.
        behavior_logps, tis_cap: enable truncated importance weights (both or neither).
        seq_weights: [B] this micro-batch's slice of the whole batch's `sequence_weights` (default: this
            batch's own), so micro-batch losses add up to the batch loss.

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
    loss = aggregate_tokens(token_losses, mask, aggregation, max_len, seq_weights)
    tokens = mask_f.sum().clamp(min=1)
    metrics = {
        "kl": ((kl.detach() * mask_f).sum() / tokens).item(),
        "clip_fraction": (((clipped.detach() < unclipped.detach()).to(logps.dtype) * mask_f).sum() / tokens).item(),
        "ratio_mean": ((ratio.detach() * mask_f).sum() / tokens).item(),
        "tis_weight_mean": ((weights * mask_f).sum() / tokens).item(),
    }
    return LossOutput(loss, metrics)


def entropy_weights(reduction: EntropyReduction, lengths: torch.Tensor, prompts: int) -> torch.Tensor:
    """[B] weights `w` with `entropy_bonus = −coef · Σ_i w_i · Σ_t H_it` for completion lengths [B].

    - `token_mean` (Cadence's default): the mean token entropy of the batch, `w_i = 1 / Σ lengths`;
    - `rollout_sum` (the paper's code, fairseq2's online GRPO): each rollout's mean token entropy, summed
      over rollouts and divided by the number of prompts (the loss's normaliser), `w_i = 1 / (len_i · prompts)`
      — about n (samples per prompt) times `token_mean`, so the paper's coefficients (1e-4 … 5e-4) carry
      over only with this reduction.
    """
    lengths = lengths.to(torch.float32)
    if reduction == "token_mean":
        return torch.full_like(lengths, 1.0) / lengths.sum().clamp(min=1)
    if reduction == "rollout_sum":
        return 1.0 / (lengths.clamp(min=1) * max(prompts, 1))
    raise ValueError(f"unknown entropy reduction {reduction!r}; use token_mean or rollout_sum")


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, coef: float, seq_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """`−coef · Σ_i w_i Σ_t H_it` over completion tokens, added to the loss to slow entropy collapse.

    Entropy regularisation (Williams & Peng 1991; Mnih et al. 2016, https://arxiv.org/abs/1602.01783):
    RL on LLMs tends to sharpen the policy until it samples one answer (entropy → 0), which ends
    exploration — the paper reports entropy and length collapse for DPO. Rewarding entropy counteracts
    it. Takes the per-token entropies (`cadence.trainer.logprobs`, computed next to the log-probs so the
    [B, T, V] logits need not be kept), the [B, T] completion mask and `entropy_weights` (default: `token_mean`
    over this batch, the mean token entropy).
    """
    mask_f = mask.to(entropy.dtype)
    if seq_weights is None:
        seq_weights = entropy_weights("token_mean", mask_f.sum(-1), 1)
    per_seq = (entropy * mask_f).sum(-1)
    return -coef * (per_seq * seq_weights.to(per_seq.device, per_seq.dtype)).sum()
