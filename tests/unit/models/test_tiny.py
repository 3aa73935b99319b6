"""The untrained tiny Llama: TOY.md's shape, and it loads with the Auto classes (and vLLM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cadence.models.tiny import tiny_config


def test_config_follows_toy_recipe() -> None:
    config = tiny_config(36)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size) == (4, 512)
    assert config.tie_word_embeddings and config.max_position_embeddings >= 15 + 14


def test_untrained_model_loads_and_generates(untrained_tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (untrained_tiny_model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny_model_dir)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 0.56e6
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(["What is 1+2?"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, batch.input_ids.shape[1] + 5)


def test_same_seed_same_weights(tmp_path: Path, untrained_tiny_model_dir: Path) -> None:
    from cadence.models.tiny import save_untrained_tiny

    again = save_untrained_tiny(tmp_path / "again", seed=0)
    other = save_untrained_tiny(tmp_path / "other", seed=1)
    original = (untrained_tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_loads_and_generates(tmp_path: Path) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "cadence.models.tiny", str(tmp_path / "m")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[" in done.stdout.strip().splitlines()[-1]  # the generated token ids
