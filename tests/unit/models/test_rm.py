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


@pytest.mark.slow  # builds tiny-rm on first use: 100 Bradley-Terry steps, over a minute on 2 busy cores
def test_rm_ranks_correct_above_incorrect_on_fresh_heldout_pairs(tiny_rm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cadence.models.rm import pairwise_accuracy, preference_pairs
    from cadence.models.toytrain import torch_threads
    from cadence.tasks.toy import load_toy

    record = json.loads((tiny_rm_dir / MARKER).read_text())
    assert record["pairwise_accuracy"]["all"] > 0.8
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_rm_dir)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    pairs = preference_pairs(load_toy("test")[:300], random.Random(12345))  # not the build's held-out draw
    with torch_threads(1):
        accuracy = pairwise_accuracy(model, tokenizer, pairs)
    assert accuracy["all"] > 0.8
    assert accuracy["unboxed"] > 0.9 and accuracy["rambling"] > 0.9
    assert accuracy["wrong"] > 0.55  # a wrong sum needs the addition checked: harder for 0.5 M parameters
