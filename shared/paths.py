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


def run_folder(runs_root: Path, run_id: str) -> Path:
    """A run's own folder under the runs root: its checkpoints, metrics, ledger and final model. Every run
    has its own, so a run never resumes another's checkpoint."""
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ValueError(f"run id {run_id!r} cannot name a folder; use letters, digits, '_', '.', '-'")
    return Path(runs_root) / run_id
