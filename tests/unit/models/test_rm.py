"""The tiny reward model ranks the concise correct answer above wrong, unboxed and rambling ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cadence.models.cache import MARKER


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir: Path) -> Path:
    from cadence.models.rm import build_tiny_rm

    return build_tiny_rm(seed=0)


def test_rm_input_is_the_chat_template_rendering() -> None:
    """The RM is trained on what the reward service feeds it: the chat template of (prompt, response)."""
    from cadence.models.rm import rm_inputs
    from cadence.models.tokenizer import build_tokenizer
    from cadence.tasks.toy import load_toy

    tokenizer = build_tokenizer()
    problem = load_toy("test")[0]
    ids = rm_inputs(tokenizer, [problem], [" \\boxed{1}"]).input_ids[0].tolist()
    assert ids == [*tokenizer(problem.text + " \\boxed{1}").input_ids, tokenizer.eos_token_id]


def test_wrong_sums_are_wrong_and_mostly_near_misses() -> None:
    """The wrong-sum negatives never hit the answer and are mostly one slip away (so the RM learns to check)."""
    from cadence.models.rm import wrong_sum

    rng = random.Random(0)
    operands = [(rng.randrange(100), rng.randrange(100)) for _ in range(2000)]
    wrong = [wrong_sum(a, b, rng) for a, b in operands]
    assert all(w != a + b and w >= 0 for w, (a, b) in zip(wrong, operands, strict=True))
    near = [abs(w - a - b) in (1, 2, 9, 10, 11, 20, 100) for w, (a, b) in zip(wrong, operands, strict=True)]
    assert 0.5 < sum(near) / len(near) < 0.9


def test_a_copy_built_by_an_older_recipe_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached tiny-rm of recipe 1 (60-68 % on wrong sums) must not be served as today's model."""
    from cadence.models import rm

    monkeypatch.setenv("CADENCE_HOME", str(tmp_path))
    built: list[Path] = []

    def build(out: Path, seed: int) -> None:
        built.append(out)
        (out / MARKER).write_text(json.dumps({"kind": "tiny-rm", "recipe": rm.RECIPE}))

    monkeypatch.setattr(rm, "_build", build)
    old = tmp_path / "models" / "tiny-rm-seed0"
    old.mkdir(parents=True)
    (old / MARKER).write_text(json.dumps({"kind": "tiny-rm", "steps": 100}))
    target = rm.build_tiny_rm(seed=0)
    assert len(built) == 1 and json.loads((target / MARKER).read_text())["recipe"] == rm.RECIPE
    assert rm.build_tiny_rm(seed=0) == target and len(built) == 1  # today's copy is reused


@pytest.mark.slow  # builds tiny-rm on first use: 600 SFT + 1750 Bradley-Terry steps, ~6.5 min on 2 quiet cores
def test_rm_ranks_correct_above_incorrect_on_fresh_heldout_pairs(tiny_rm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cadence.models.rm import pairwise_accuracy, preference_pairs
    from cadence.models.toytrain import torch_threads
    from cadence.tasks.toy import load_toy

    record = json.loads((tiny_rm_dir / MARKER).read_text())
    assert min(record["pairwise_accuracy"]["all"], record["pairwise_accuracy"]["wrong"]) >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    pairs = preference_pairs(load_toy("test")[:300], random.Random(12345))  # not the build's held-out draw
    with torch_threads(1):
        accuracy = pairwise_accuracy(model, tokenizer, pairs)
    assert accuracy["all"] > 0.9
    assert accuracy["unboxed"] > 0.9 and accuracy["rambling"] > 0.9
    assert accuracy["wrong"] > 0.85  # the sum checked: ~100 wrong-sum pairs, a standard error of ~3 points
