"""Turn a model reference from a config or a flag into something `from_pretrained` / vLLM accept."""

from __future__ import annotations

import re
from pathlib import Path

from cadence.errors import ConfigError

SEED_MODELS = ("tiny", "tiny-rm", "smollm2")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(name_or_path: str) -> Path | str:
    """A seed-model name (built and cached on first use), a local directory, or a hub id.

    `tiny` → `build_tiny()`, `tiny-rm` → `build_tiny_rm()`, `smollm2` → `build_smollm2()`; an existing
    directory is returned as a `Path`; an `owner/name` hub id is returned unchanged as a `str`, for
    transformers or vLLM to download. Offline (no hub access, `HF_HUB_OFFLINE=1`), a hub id only works
    when the model is already in the local Hugging Face cache.
    """
    if name_or_path in SEED_MODELS:
        from cadence.models import rm, seed, smollm2

        builders = {"tiny": seed.build_tiny, "tiny-rm": rm.build_tiny_rm, "smollm2": smollm2.build_smollm2}
        return builders[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_local = name_or_path.startswith(("/", ".", "~")) or path.exists()
    if not looks_local and _HUB_ID.fullmatch(name_or_path):
        return name_or_path
    raise ConfigError(
        f"model {name_or_path!r} is neither a seed model ({', '.join(SEED_MODELS)}), an existing model "
        "directory, nor a hub id of the form 'owner/name'; fix the path or build one with `cadence seed-model`"
    )
