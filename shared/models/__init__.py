"""Models: the toy tokenizer, the tiny Llama, seed-model builders (`cadence.models.seed`) and
`resolve_model`, which turns a config's model reference into a directory or hub id.

Importing this package is cheap: torch and transformers are imported inside the functions that use them.
"""

from cadence.models.registry import SEED_MODELS, resolve_model

__all__ = ["SEED_MODELS", "resolve_model"]
