"""Chunked log-probs and entropies equal the full-vocabulary log-softmax, values and gradients."""

from __future__ import annotations

import pytest
import torch

from cadence.trainer.logprobs import selective_stats


def _reference(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainer computed before: one fp32 log-softmax over the whole batch."""
    all_logps = torch.log_softmax(logits.float(), dim=-1)
    logps = all_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(all_logps.exp() * all_logps).sum(-1)
    return logps * mask, entropy * mask


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_chunks_equal_the_full_log_softmax_with_gradients(chunk: int) -> None:
    """Three rows with completions at different offsets (prompt and padding positions masked), 7 positions,
    a 50-token vocabulary; chunks of 1, 3 and 256 positions. Log-probs, entropies and the gradient of a
    loss that uses both match the one-shot computation."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]).float()
    coef = torch.linspace(0.5, 1.5, 7)  # gives every position its own gradient weight
    logps, entropy = selective_stats(logits, targets, mask, entropy_grad=True, chunk=chunk)
    ((logps * coef).sum() + (entropy * coef).sum() * 0.3).backward()
    grad, logits.grad = logits.grad.clone(), None
    want_logps, want_entropy = _reference(logits, targets, mask)
    ((want_logps * coef).sum() + (want_entropy * coef).sum() * 0.3).backward()
    assert torch.allclose(logps, want_logps, atol=1e-6)
    assert torch.allclose(entropy, want_entropy, atol=1e-6)
    assert torch.allclose(grad, logits.grad, atol=1e-6)


def test_entropy_is_a_detached_metric_unless_asked_and_can_be_skipped() -> None:
    logits = torch.randn(2, 4, 10, requires_grad=True)
    targets, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    logps, entropy = selective_stats(logits, targets, mask)
    assert logps.requires_grad and not entropy.requires_grad
    _, skipped = selective_stats(logits, targets, mask, entropy=False)
    assert (skipped == 0).all()


def test_bf16_logits_are_scored_in_fp32() -> None:
    """bf16 logits (the GPU case): the result is fp32 and equals the fp32 log-softmax of the same values."""
    logits = torch.randn(1, 5, 30).to(torch.bfloat16)
    targets, mask = torch.randint(0, 30, (1, 5)), torch.ones(1, 5)
    logps, entropy = selective_stats(logits, targets, mask, chunk=2)
    want_logps, want_entropy = _reference(logits, targets, mask)
    assert logps.dtype == torch.float32
    assert torch.allclose(logps, want_logps, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
