"""The reward model wrapper: chat-template rendering, token-budget batching, scores equal to a bare forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cadence.reward.reward_model import RewardModel


@pytest.fixture(scope="module")
def rm(random_rm_dir: Path) -> RewardModel:
    torch.set_num_threads(1)
    return RewardModel(str(random_rm_dir), device="cpu", max_batch_tokens=128)


def test_renders_with_the_chat_template(rm: RewardModel) -> None:
    assert rm.tokenizer.chat_template
    assert rm.render("What is 1+2?", " \\boxed{3}") == "<s>What is 1+2? \\boxed{3}</s>"


def test_batches_respect_the_token_budget(rm: RewardModel) -> None:
    lengths = [64, 10, 30, 5, 64, 12, 40]
    groups = rm.batches(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= rm.max_batch_tokens or len(group) == 1


def test_scores_match_one_unpadded_forward_each(rm: RewardModel) -> None:
    pairs = [("What is 1+2?", " \\boxed{3}"), ("What is 10+20?", " it is 30" * 5), ("What is 5+5?", " 10")]
    scores = rm.score(pairs)
    for (prompt, response), score in zip(pairs, scores, strict=True):
        ids = rm.tokenizer(rm.render(prompt, response), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            expected = rm.model(**ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_overlong_inputs_are_cut_on_the_left(rm: RewardModel) -> None:
    ids = rm.encode([("What is 1+2?", " 3" * 200)])
    assert len(ids[0]) == rm.max_length
    assert rm.tokenizer.decode(ids[0][-1:]) == "</s>"
    assert rm.score([]) == []


@pytest.mark.slow  # builds tiny-rm on first use (over a minute on 2 busy cores), then reuses the cache
def test_the_tiny_seed_rm_prefers_correct_concise_answers() -> None:
    """The RM path end to end on `cadence seed-model tiny-rm` (built once, cached under CADENCE_HOME)."""
    from cadence.models.rm import build_tiny_rm

    torch.set_num_threads(1)
    rm = RewardModel(str(build_tiny_rm()), device="cpu")
    prompts = [f"What is {a}+{b}?" for a, b in ((12, 30), (7, 8), (45, 45), (3, 96))]
    answers = [42, 15, 90, 99]
    good = rm.score([(p, f" \\boxed{{{n}}}") for p, n in zip(prompts, answers, strict=True)])
    unboxed = rm.score([(p, f" {n}") for p, n in zip(prompts, answers, strict=True)])
    assert sum(g > u for g, u in zip(good, unboxed, strict=True)) >= 3
