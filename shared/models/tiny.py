"""The tiny Llama of the embedded default (TOY.md): 0.53 M parameters on the character tokenizer.

`python -m cadence.models.tiny` saves a random-init model and checks that vLLM loads it and generates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cadence.models.tokenizer import MAX_LENGTH

if TYPE_CHECKING:
    from transformers import LlamaConfig


def tiny_config(vocab_size: int, *, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> LlamaConfig:
    """Hidden 128, 2 layers, 4 heads (4 KV heads), intermediate 512, tied embeddings (TOY.md)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype="float32",
    )


def save_untrained_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny `LlamaForCausalLM` and the toy tokenizer to `out_dir` (safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from cadence.models.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_untrained_rm(out_dir: Path, seed: int = 0) -> Path:
    """Save a random-init tiny reward model (`LlamaForSequenceClassification`, one score) and the toy
    tokenizer: the shape of `tiny-rm` without its training, for tests and benchmarks that need speed only."""
    import torch
    from transformers import LlamaForSequenceClassification

    from cadence.models.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config.num_labels = 1
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    LlamaForSequenceClassification(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _check_vllm(model_dir: Path) -> None:
    """Load `model_dir` in vLLM (CPU, fp32, eager) and greedily generate a few tokens."""
    import os

    from cadence.paths import cadence_home

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cadence_home() / "vllm"))
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_LENGTH, enforce_eager=True)
    outputs = llm.generate(["What is 12+34?"], SamplingParams(max_tokens=8, temperature=0.0))
    print(repr(outputs[0].outputs[0].text), outputs[0].outputs[0].token_ids)


if __name__ == "__main__":
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cadence-tiny-"))
    _check_vllm(save_untrained_tiny(target))
