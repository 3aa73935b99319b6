"""Builds a generation engine by kind; the one place that knows every engine class."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cadence.errors import ConfigError
from cadence.inference.engine import Engine
from cadence.inference.hf_engine import HFEngine

ENGINE_KINDS = ("vllm", "hf")


def resolve_engine_kind(kind: str) -> str:
    """`auto` → `vllm` when the vllm package is importable, else `hf`; other kinds are checked."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"unknown engine {kind!r}; use one of {', '.join(ENGINE_KINDS)} or auto (CADENCE_ENGINE)")
    return kind


def create_engine(kind: str, model_path: str | Path, **options: Any) -> Engine:
    """Build the engine named `kind` (`vllm`, `hf` or `auto`) on the model at `model_path`."""
    resolved = resolve_engine_kind(kind)
    if resolved == "vllm":
        from cadence.inference.vllm_engine import VllmEngine

        return VllmEngine(model_path, **options)
    return HFEngine(model_path, **options)
