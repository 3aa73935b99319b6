"""Seed models are built once into `models_dir()/<name>` and reused; a build is atomic.

The builder writes into a temporary folder beside the target and the folder is renamed into place
only when complete, so an interrupted build never leaves a half-written model that looks cached.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cadence.paths import models_dir

MARKER = "cadence_seed.json"
"""Written last by every builder: its presence means the folder is complete."""


def cached_build(name: str, build: Callable[[Path], None], force: bool = False) -> Path:
    """`models_dir()/name`, built by `build(tmp_dir)` unless a complete copy exists (or `force`)."""
    target = models_dir() / name
    if (target / MARKER).is_file() and not force:
        return target
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        work.chmod(0o755)  # mkdtemp makes it private; the model is shared with other users' services
        build(work)
        if not (work / MARKER).is_file():
            raise RuntimeError(f"builder for {name} did not write {MARKER}")
        for file in work.rglob("*"):
            file.chmod(0o755 if file.is_dir() else 0o644)  # some writers create private (0600) files
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=target.parent))
            target.rename(trash / name)
            shutil.rmtree(trash, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
