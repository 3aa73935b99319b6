"""Where Cadence keeps caches and seed models on this machine."""

from __future__ import annotations

from pathlib import Path

from cadence.settings import CommonSettings


def cadence_home() -> Path:
    """The cache root: `CADENCE_HOME`, else `~/.cache/cadence`. Created on first use."""
    root = CommonSettings().home
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Seed models built by `cadence seed-model` live here, one folder each."""
    path = cadence_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
