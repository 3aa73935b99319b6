"""Per-token log-probs and entropies from logits in bounded memory.

A full-vocabulary log-softmax in fp32 costs 4·V bytes a position (0.5 MB for Llama-3's 128k vocabulary):
for a rank's shard of 2k-token rollouts that is tens of GB, more than the model. Here it is never built
for a whole batch. Each sequence's completion positions (prompt and padding positions are skipped) are
taken in chunks of `CHUNK_POSITIONS`; a chunk's log-prob of the sampled token is `logit − logsumexp` and
its entropy `logsumexp − Σ softmax·logit`, computed in fp32 from the model's own logits. With gradients,
each chunk runs under activation checkpointing, so backward keeps only the logits (which the model's
graph holds anyway) and recomputes one chunk's fp32 intermediates at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_POSITIONS = 256
"""Positions per fp32 log-softmax chunk: 256 × 128k vocabulary × 4 bytes = 128 MB for each intermediate."""


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, V] logits and [C] targets → ([C] log-prob of each target, [C] entropy or zeros), in fp32."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    logps = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logps, torch.zeros_like(lse)
    return logps, lse - (torch.softmax(x, dim=-1) * x).sum(-1)


def _run_chunk(logits: torch.Tensor, targets: torch.Tensor, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and logits.requires_grad:
        return checkpoint(_chunk_stats, logits, targets, entropy, use_reentrant=False)
    return _chunk_stats(logits, targets, entropy)


def selective_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: bool = True,
    entropy_grad: bool = False,
    chunk: int = CHUNK_POSITIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] logits (position i predicts `targets[:, i]`), [B, T] targets and mask → ([B, T] log-probs,
    [B, T] entropies), fp32, zero where `mask` is 0.

    The log-probs keep their graph when the logits have one; the entropies only with `entropy_grad` (an
    entropy bonus), otherwise they are a detached metric; `entropy=False` skips them (zeros). A
    sequence's masked positions must be contiguous (a completion), which is what `SequenceBatch` builds.
    """
    rows_logps, rows_entropy = [], []
    width = logits.shape[1]
    for row in range(logits.shape[0]):
        positions = mask[row].nonzero()
        zeros = logits.new_zeros(width, dtype=torch.float32)
        if positions.numel() == 0:
            rows_logps.append(zeros)
            rows_entropy.append(zeros)
            continue
        start, end = int(positions[0]), int(positions[-1]) + 1
        bounds = [(lo, min(lo + chunk, end)) for lo in range(start, end, chunk)]
        pieces = [_run_chunk(logits[row, lo:hi], targets[row, lo:hi], entropy) for lo, hi in bounds]
        rows_logps.append(torch.cat([zeros[:start], *(p for p, _ in pieces), zeros[end:]]))
        entropies = torch.cat([zeros[:start], *(e for _, e in pieces), zeros[end:]])
        rows_entropy.append(entropies if entropy_grad else entropies.detach())
    mask_f = mask.to(torch.float32)
    return torch.stack(rows_logps) * mask_f, torch.stack(rows_entropy) * mask_f
