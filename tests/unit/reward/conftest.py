"""Fixtures for the reward tests: a random-init tiny sequence-classification model (fast, real)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def random_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `LlamaForSequenceClassification` (1 label) with random weights and the toy tokenizer."""
    import torch
    from transformers import LlamaForSequenceClassification

    from cadence.models.tiny import tiny_config
    from cadence.models.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("random-rm")
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
