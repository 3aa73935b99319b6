"""Loss functions against expectations worked by hand (each docstring shows the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from cadence.trainer.logprobs import selective_stats
from cadence.trainer.losses import (
    aggregate_tokens,
    dpo_loss,
    entropy_bonus,
    entropy_weights,
    group_weights,
    grpo_loss,
    k3_kl,
    sequence_weights,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^−x)."""
    return math.log1p(math.exp(-x))


TWO_PAIRS = {
    "policy_chosen_logps": _t(-10.0, -5.0),
    "policy_rejected_logps": _t(-12.0, -5.0),
    "ref_chosen_logps": _t(-11.0, -5.0),
    "ref_rejected_logps": _t(-11.0, -5.0),
}


def test_dpo_two_pairs_by_hand() -> None:
    """β = 0.1.
    Pair 1: chosen reward 0.1·(−10 − (−11)) = 0.1, rejected 0.1·(−12 − (−11)) = −0.1, margin 0.2,
            loss −log σ(0.2) = log(1 + e^−0.2) = log 1.818731 = 0.598139.
    Pair 2: policy = reference, margin 0, loss log 2 = 0.693147.
    Mean loss (0.598139 + 0.693147) / 2 = 0.645643; accuracy 1/2; margin mean 0.1;
    chosen rewards mean 0.05, rejected −0.05.
    """
    out = dpo_loss(**TWO_PAIRS, beta=0.1)
    assert out.loss.item() == pytest.approx(0.645643, abs=1e-6)
    assert out.metrics["reward_accuracy"] == 0.5
    assert out.metrics["margin"] == pytest.approx(0.1)
    assert out.metrics["chosen_rewards"] == pytest.approx(0.05)
    assert out.metrics["rejected_rewards"] == pytest.approx(-0.05)
    assert out.metrics["chosen_logps"] == pytest.approx(-7.5)
    assert out.metrics["rejected_logps"] == pytest.approx(-8.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    """d loss / d chosen = −β·σ(−margin) < 0: descending raises the chosen log-prob, lowers the rejected."""
    chosen = _t(-10.0, -5.0).requires_grad_()
    rejected = _t(-12.0, -5.0).requires_grad_()
    dpo_loss(chosen, rejected, _t(-11.0, -5.0), _t(-11.0, -5.0), beta=0.1).loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    # Pair 2 (margin 0): −0.1·σ(0)/2 = −0.025 (the /2 is the batch mean).
    assert chosen.grad[1].item() == pytest.approx(-0.025)
    assert rejected.grad[1].item() == pytest.approx(0.025)


def test_dpo_length_normalised_by_hand() -> None:
    """Chosen lengths (2, 1), rejected (4, 1), β = 0.1.
    Pair 1 per-token: policy chosen −10/2 = −5, rejected −12/4 = −3, ref chosen −11/2 = −5.5,
    ref rejected −11/4 = −2.75 → chosen reward 0.05, rejected −0.025, margin 0.075.
    Pair 2: margin 0 → log 2. Mean: (log(1 + e^−0.075) + log 2) / 2.
    """
    out = dpo_loss(**TWO_PAIRS, beta=0.1, chosen_lengths=_t(2, 1), rejected_lengths=_t(4, 1), length_normalize=True)
    assert out.loss.item() == pytest.approx((softplus(0.075) + math.log(2)) / 2, abs=1e-9)
    assert out.metrics["margin"] == pytest.approx(0.0375)


def test_dpo_nll_on_chosen_by_hand() -> None:
    """NLL per chosen token: 10/2 = 5 and 5/1 = 5 → mean 5; with coef 0.5 the loss is 0.645643 + 2.5."""
    out = dpo_loss(**TWO_PAIRS, beta=0.1, chosen_lengths=_t(2, 1), rejected_lengths=_t(4, 1), nll_coef=0.5)
    assert out.loss.item() == pytest.approx(0.645643 + 2.5, abs=1e-6)
    assert out.metrics["nll"] == pytest.approx(5.0)


def test_dpo_nll_summed_over_the_sequence_by_hand() -> None:
    """The paper's code sums the NLL over the chosen response: 10 and 5 → mean 7.5; coef 0.5 → +3.75."""
    out = dpo_loss(
        **TWO_PAIRS,
        beta=0.1,
        chosen_lengths=_t(2, 1),
        rejected_lengths=_t(4, 1),
        nll_coef=0.5,
        nll_reduction="sequence_sum",
    )
    assert out.loss.item() == pytest.approx(0.645643 + 3.75, abs=1e-6)
    assert out.metrics["nll"] == pytest.approx(7.5)


def test_group_dpo_averages_within_prompt_then_over_prompts() -> None:
    """Three pairs, the first two from prompt 0, the third from prompt 1; margins 0.2, 0, 0.
    Per pair: a = log(1 + e^−0.2), b = log 2, c = log 2. GroupDPO: ((a + b)/2 + c)/2, not (a+b+c)/3.
    """
    out = dpo_loss(
        _t(-10.0, -5.0, -1.0),
        _t(-12.0, -5.0, -1.0),
        _t(-11.0, -5.0, -1.0),
        _t(-11.0, -5.0, -1.0),
        beta=0.1,
        pair_weights=group_weights([0, 0, 1]),
    )
    a, b = softplus(0.2), math.log(2)
    assert out.loss.item() == pytest.approx(((a + b) / 2 + b) / 2, abs=1e-9)


def test_group_weights_are_built_on_the_requested_device() -> None:
    """Finding 4: GroupDPO's weights were a CPU tensor index_add'ed into the losses' CUDA tensor. They are
    built from plain ids directly on the device asked for (`meta` stands in for CUDA here; the `gpu` test
    below runs the real thing). Prompt 0 has two pairs, prompt 1 one: weights 1/4, 1/4, 1/2."""
    assert group_weights([0, 0, 1], device="meta").device.type == "meta"
    assert group_weights([0, 0, 1]).tolist() == [0.25, 0.25, 0.5]
    assert group_weights([7, 3, 3, 7]).sum().item() == pytest.approx(1.0)


@pytest.mark.gpu
def test_group_dpo_on_cuda() -> None:
    """The same GroupDPO loss as above, every tensor on the GPU, the weights built there from plain ids."""
    cuda = torch.device("cuda")
    out = dpo_loss(
        *(
            t.to(cuda)
            for t in (_t(-10.0, -5.0, -1.0), _t(-12.0, -5.0, -1.0), _t(-11.0, -5.0, -1.0), _t(-11.0, -5.0, -1.0))
        ),
        beta=0.1,
        pair_weights=group_weights([0, 0, 1], device=cuda),
    )
    a, b = softplus(0.2), math.log(2)
    assert out.loss.device.type == "cuda"
    assert out.loss.item() == pytest.approx(((a + b) / 2 + b) / 2, abs=1e-6)


def test_dpo_refuses_empty_batch_and_missing_lengths() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_loss(_t(), _t(), _t(), _t(), beta=0.1)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(**TWO_PAIRS, beta=0.1, length_normalize=True)


# A GRPO group of two sequences, T = 3: the first has 2 completion tokens, the second 3.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADVANTAGES = _t(1.0, -0.5)


@pytest.mark.parametrize(
    ("aggregation", "max_len", "expected"),
    [
        # On-policy (ratio 1), KL 0: each token's loss is −A: seq 1 (−1, −1), seq 2 (0.5, 0.5, 0.5).
        # grpo: per-sequence means −1 and 0.5 → mean −0.25.
        ("grpo", None, -0.25),
        # bnpo: (−1 −1 + 0.5·3) / 5 tokens = −0.5 / 5 = −0.1.
        ("bnpo", None, -0.1),
        # dr_grpo: sum −0.5 ÷ (B·max_len) = −0.5 / (2·3).
        ("dr_grpo", None, -0.5 / 6),
        # dr_grpo with the sampling max_tokens = 4: −0.5 / 8 = −0.0625.
        ("dr_grpo", 4, -0.0625),
        # the paper's: per-rollout sums −2 and 1.5, mean over the 2 rollouts → −0.25 (no max_len constant).
        ("seq_mean_token_sum", 4, -0.25),
    ],
)
def test_grpo_aggregations_by_hand(aggregation: str, max_len: int | None, expected: float) -> None:
    """See the parameter comments: one group, on-policy, no KL, each aggregation worked by hand."""
    logps = torch.full((2, 3), -1.0, dtype=torch.float64)
    out = grpo_loss(logps, logps, logps, ADVANTAGES, MASK, kl_beta=0.0, aggregation=aggregation, max_len=max_len)
    assert out.loss.item() == pytest.approx(expected)
    assert out.metrics["ratio_mean"] == pytest.approx(1.0)
    assert out.metrics["clip_fraction"] == 0.0


def test_sequence_weights_let_micro_batches_add_up_to_the_batch() -> None:
    """Each aggregation is Σ_i w_i·(token-loss sum of i); splitting the batch in two micro-batches, each with
    its slice of the whole batch's weights, gives the same total — also for `bnpo` and `grpo`, whose
    normalisers (all tokens, each length) are not those of either half."""
    torch.manual_seed(0)
    losses = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    for aggregation in ("grpo", "bnpo", "dr_grpo", "seq_mean_token_sum"):
        whole = aggregate_tokens(losses, mask, aggregation, max_len=6)
        weights = sequence_weights(aggregation, mask.sum(-1), max_len=6)
        halves = sum(
            aggregate_tokens(losses[s], mask[s], aggregation, 6, weights[s]) for s in (slice(0, 2), slice(2, 5))
        )
        assert halves.item() == pytest.approx(whole.item(), abs=1e-12), aggregation


def test_dr_grpo_needs_its_constant() -> None:
    with pytest.raises(ValueError, match="max_len"):
        sequence_weights("dr_grpo", torch.tensor([2, 3]))


def test_k3_kl_by_hand() -> None:
    """logp = log 0.5, ref = log 0.25: d = ref − logp = log 0.5; k3 = 0.5 − log 0.5 − 1 = 0.193147.
    Equal log-probs give exactly 0."""
    kl = k3_kl(_t(math.log(0.5), -1.0), _t(math.log(0.25), -1.0))
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl[1].item() == 0.0


def test_grpo_kl_term_adds_beta_times_k3() -> None:
    """Advantages 0, every token with k3 = 0.193147 (as above), β = 0.1, bnpo → 0.0193147."""
    logps = torch.full((2, 3), math.log(0.5), dtype=torch.float64)
    ref = torch.full((2, 3), math.log(0.25), dtype=torch.float64)
    out = grpo_loss(logps, logps, ref, _t(0.0, 0.0), MASK, kl_beta=0.1, aggregation="bnpo")
    assert out.loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    assert out.metrics["kl"] == pytest.approx(0.5 + math.log(2) - 1)


def test_grpo_clip_is_pessimistic_by_hand() -> None:
    """Ratio 1.5, ε = 0.2. A = +1: min(1.5, 1.2) = 1.2 → loss −1.2 (clipped: no extra push).
    A = −1: min(−1.5, −1.2) = −1.5 → loss +1.5 (unclipped: the penalty is kept). bnpo over one token each."""
    old = torch.zeros(2, 1, dtype=torch.float64)
    logps = old + math.log(1.5)
    mask = torch.ones(2, 1)
    up = grpo_loss(logps[:1], old[:1], logps[:1], _t(1.0), mask[:1], kl_beta=0.0, aggregation="bnpo")
    down = grpo_loss(logps[1:], old[1:], logps[1:], _t(-1.0), mask[1:], kl_beta=0.0, aggregation="bnpo")
    assert up.loss.item() == pytest.approx(-1.2)
    assert up.metrics["clip_fraction"] == 1.0
    assert down.loss.item() == pytest.approx(1.5)
    assert down.metrics["clip_fraction"] == 0.0


def test_truncated_importance_weight_is_capped() -> None:
    """old − behavior = log 3 → weight min(3, 2) = 2; on-policy w.r.t. old, A = 1: token loss −2."""
    logps = torch.zeros(1, 1, dtype=torch.float64)
    behavior = logps - math.log(3)
    out = grpo_loss(logps, logps, logps, _t(1.0), torch.ones(1, 1), kl_beta=0.0, behavior_logps=behavior, tis_cap=2.0)
    assert out.loss.item() == pytest.approx(-2.0)
    assert out.metrics["tis_weight_mean"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="both"):
        grpo_loss(logps, logps, logps, _t(1.0), torch.ones(1, 1), behavior_logps=behavior)


def test_unknown_aggregation_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="dr_grpo"):
        aggregate_tokens(torch.zeros(1, 1), torch.ones(1, 1), "mean")  # type: ignore[arg-type]


def test_entropy_of_uniform_and_bonus_sign() -> None:
    """Uniform over 4 tokens: entropy log 4 = 1.386294. A one-hot-ish distribution has ~0 entropy.
    Bonus = −coef · mean entropy over the mask: coef 0.1, tokens (log 4, ~0) masked to the first → −0.1386."""
    logits = torch.stack([torch.zeros(4), torch.tensor([50.0, 0, 0, 0])]).unsqueeze(0)
    _, entropy = selective_stats(logits, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    assert entropy[0, 0].item() == pytest.approx(math.log(4))
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    bonus = entropy_bonus(entropy, torch.tensor([[1, 0]]), coef=0.1)
    assert bonus.item() == pytest.approx(-0.1 * math.log(4))


def test_entropy_bonus_summed_per_rollout_by_hand() -> None:
    """The paper's code: each rollout's mean token entropy, summed, ÷ prompts. Rollouts with entropies
    (1, 3) and (2, 2, 2) → means 2 and 2 → sum 4; 1 prompt, coef 0.1 → −0.4. Token mean: 10/5 = 2 → −0.2."""
    entropy = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    lengths = MASK.sum(-1)
    rollout = entropy_bonus(entropy, MASK, 0.1, entropy_weights("rollout_sum", lengths, prompts=1))
    assert rollout.item() == pytest.approx(-0.4)
    token = entropy_bonus(entropy, MASK, 0.1, entropy_weights("token_mean", lengths, prompts=1))
    assert token.item() == pytest.approx(-0.2)
