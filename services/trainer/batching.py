"""From rewards to training signal: DPO pairs and GRPO advantages, as pure functions of rewards.

Each prompt's samples form a group. A mixed-task batch routes each group by its prompt's `task`:
`math` rewards come from the verifier (1 correct / 0 wrong), `chat` rewards from a reward model
(any real number), and the two pick pairs differently (DESIGN.md §5).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PairMode = Literal["verifiable", "rm"]
TASK_PAIR_MODE: dict[str, PairMode] = {"math": "verifiable", "chat": "rm"}
CORRECT_THRESHOLD = 0.5
"""A verifiable sample is correct when its reward is at least this (math-verify gives 1 or 0)."""


@dataclass(frozen=True)
class Pair:
    """One DPO pair: sample indices inside the group of prompt `group`."""

    group: int
    chosen: int
    rejected: int


@dataclass(frozen=True)
class PairSelection:
    """The pairs of a batch and how many prompts gave none (all rewards equal)."""

    pairs: list[Pair]
    kept_prompts: int
    skipped_prompts: int


def pair_mode(task: str) -> PairMode:
    """How a prompt of `task` picks its pairs; unknown tasks are refused with the valid names."""
    try:
        return TASK_PAIR_MODE[task]
    except KeyError:
        valid = ", ".join(sorted(TASK_PAIR_MODE))
        raise ValueError(f"unknown task {task!r} on a scored rollout; valid tasks: {valid}") from None


def select_pairs(
    rewards: Sequence[float], mode: PairMode, rng: random.Random, *, group: bool = False
) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices for one prompt; empty when every reward is equal.

    - verifiable: a random correct vs a random incorrect sample (Pang et al. 2024, Iterative RPO);
    - rm: the highest- vs the lowest-scored sample (Xu et al. 2023; ties broken at random);
    - `group` (GroupDPO): every correct × incorrect pair; for rm, every above-mean × below-mean pair.
    """
    if len(rewards) < 2 or max(rewards) == min(rewards):
        return []
    if mode == "verifiable":
        good = [i for i, r in enumerate(rewards) if r >= CORRECT_THRESHOLD]
        bad = [i for i, r in enumerate(rewards) if r < CORRECT_THRESHOLD]
    else:
        mean = sum(rewards) / len(rewards)
        good = [i for i, r in enumerate(rewards) if r > mean]
        bad = [i for i, r in enumerate(rewards) if r < mean]
    if not good or not bad:
        return []
    if group:
        return [(c, r) for c in good for r in bad]
    if mode == "rm":
        good = [i for i, r in enumerate(rewards) if r == max(rewards)]
        bad = [i for i, r in enumerate(rewards) if r == min(rewards)]
    return [(rng.choice(good), rng.choice(bad))]


def build_pairs(
    groups: Sequence[tuple[str, Sequence[float]]], rng: random.Random, *, group: bool = False
) -> PairSelection:
    """Pairs for a batch of `(task, rewards)` groups, each routed by its task; counts skipped prompts."""
    pairs: list[Pair] = []
    kept = skipped = 0
    for index, (task, rewards) in enumerate(groups):
        chosen = select_pairs(rewards, pair_mode(task), rng, group=group)
        if chosen:
            kept += 1
            pairs.extend(Pair(index, c, r) for c, r in chosen)
        else:
            skipped += 1
    return PairSelection(pairs, kept, skipped)


def grpo_advantages(rewards: Sequence[float], *, std_normalize: bool = False, eps: float = 1e-6) -> list[float]:
    """Group-relative advantages `r − mean(r)`, optionally ÷ (std + ε) (Shao et al. 2024, GRPO).

    Dr. GRPO (Liu et al. 2025) drops the std division: it up-weights prompts that are nearly always
    solved or nearly always failed, a difficulty bias. The paper keeps it optional; default off.
    The std is the population std of the group (ddof 0).
    """
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not std_normalize:
        return centred
    std = (sum(c * c for c in centred) / len(centred)) ** 0.5
    return [c / (std + eps) for c in centred]


def micro_batches(lengths: Sequence[int], budget: int, per_item: int = 1) -> list[list[int]]:
    """Item indices grouped into micro-batches of at most `budget` padded tokens each.

    An item is `per_item` sequences (a DPO pair: 2) of up to `lengths[i]` tokens; a micro-batch of k items
    pads to k · per_item · its longest length. Items are taken shortest first (less padding; the update's
    result does not depend on the order), and an item over the budget on its own forms a micro-batch alone.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * per_item * lengths[index] > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
