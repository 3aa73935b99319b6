"""Pair selection and advantages, worked by hand."""

from __future__ import annotations

import random

import pytest

from cadence.trainer.batching import build_pairs, grpo_advantages, micro_batches, pair_mode, select_pairs


def test_verifiable_pair_is_a_correct_vs_an_incorrect_sample() -> None:
    """Rewards (1, 0, 1, 0, 0): correct {0, 2}, incorrect {1, 3, 4}; every draw is one of each."""
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        [(chosen, rejected)] = select_pairs([1, 0, 1, 0, 0], "verifiable", rng)
        assert chosen in {0, 2} and rejected in {1, 3, 4}
        seen.add((chosen, rejected))
    assert len(seen) == 6  # random over all 2 × 3 combinations, not always the first


def test_pair_choice_is_seeded() -> None:
    draws = [select_pairs([1, 0, 1, 0, 0, 1, 0, 1], "verifiable", random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]


def test_rm_pair_is_highest_vs_lowest() -> None:
    """Scores (0.3, −1.2, 2.5, 0.0): highest index 2, lowest index 1."""
    assert select_pairs([0.3, -1.2, 2.5, 0.0], "rm", random.Random(0)) == [(2, 1)]


@pytest.mark.parametrize("mode", ["verifiable", "rm"])
@pytest.mark.parametrize("rewards", [[1, 1, 1], [0, 0, 0, 0], [0.5], []])
def test_all_equal_rewards_give_no_pair(mode: str, rewards: list[float]) -> None:
    assert select_pairs(rewards, mode, random.Random(0)) == []  # type: ignore[arg-type]


def test_group_dpo_uses_every_correct_incorrect_pair() -> None:
    """Correct {0, 2}, incorrect {1, 3, 4} → 2 × 3 = 6 pairs, in order."""
    pairs = select_pairs([1, 0, 1, 0, 0], "verifiable", random.Random(0), group=True)
    assert pairs == [(0, 1), (0, 3), (0, 4), (2, 1), (2, 3), (2, 4)]


def test_group_rm_pairs_above_mean_with_below_mean() -> None:
    """Scores (3, 1, 2, 0): mean 1.5; above {0, 2}, below {1, 3} → 4 pairs."""
    pairs = select_pairs([3, 1, 2, 0], "rm", random.Random(0), group=True)
    assert pairs == [(0, 1), (0, 3), (2, 1), (2, 3)]


def test_mixed_batch_routes_by_task_and_counts_skips() -> None:
    """Group 0 (math, all wrong) is skipped; group 1 (chat, 0.1 vs 0.2) pairs 1 over 0 by score —
    as math the same rewards would be two wrong answers and give no pair; group 2 (math) one pair."""
    selection = build_pairs([("math", [0, 0, 0]), ("chat", [0.1, 0.2]), ("math", [0, 1])], random.Random(0))
    assert selection.skipped_prompts == 1
    assert selection.kept_prompts == 2
    assert [(p.group, p.chosen, p.rejected) for p in selection.pairs] == [(1, 1, 0), (2, 1, 0)]
    assert build_pairs([("math", [0.1, 0.2])], random.Random(0)).skipped_prompts == 1


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="valid tasks: chat, math"):
        pair_mode("poetry")


def test_grpo_advantages_by_hand() -> None:
    """Rewards (1, 0, 0, 1): mean 0.5 → (0.5, −0.5, −0.5, 0.5); std 0.5 → ÷ 0.5 → (1, −1, −1, 1)."""
    assert grpo_advantages([1, 0, 0, 1]) == [0.5, -0.5, -0.5, 0.5]
    normalised = grpo_advantages([1, 0, 0, 1], std_normalize=True, eps=0.0)
    assert normalised == [1.0, -1.0, -1.0, 1.0]
    assert grpo_advantages([1, 1, 1], std_normalize=True) == [0.0, 0.0, 0.0]


def test_micro_batches_fill_the_token_budget_shortest_first() -> None:
    """Lengths 5, 9, 3, 4 with a budget of 12 padded tokens: sorted 3, 4, 5, 9 → [3, 4] pads to 2·4 = 8,
    adding 5 would pad to 15 > 12, so [5] then [9] (2·9 > 12). Pairs (2 sequences each) with budget 20:
    [3, 4] pads to 2·2·4 = 16, [5] 10, [9] 18. A 30-token item over the budget of 12 stands alone."""
    assert micro_batches([5, 9, 3, 4], 12) == [[2, 3], [0], [1]]
    assert micro_batches([5, 9, 3, 4], 20, per_item=2) == [[2, 3], [0], [1]]
    assert micro_batches([30, 2], 12) == [[1], [0]]
    assert micro_batches([3, 3, 3], 100) == [[0, 1, 2]]
