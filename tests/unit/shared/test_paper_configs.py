"""The paper configs carry Table 4 of Lanchantin et al. 2025 (arXiv 2506.21495), line by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadence.config import DPOConfig, GRPOConfig, load_run_config
from cadence.trainer.schedule import Schedule

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PAPER = sorted(p for p in CONFIGS.glob("*.yaml") if p.name.startswith(("numina-", "wildchat-", "combined-")))
# Per recipe: DPO β, AdamW ε, new tokens, prompts a step. lr 1e-6, clip 0.1 and n = 8 are common to all.
RECIPES = {"numina": (0.1, 1e-4, 2048, 64), "wildchat": (0.01, 1e-8, 1024, 32), "combined": (0.01, 1e-8, 1024, 32)}


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_matches_table_4(path: Path) -> None:
    config = load_run_config(path)
    beta, eps, tokens, prompts = RECIPES[path.stem.split("-")[0]]
    assert (config.optimizer.lr, config.optimizer.grad_clip, config.sampling.n) == (1e-6, 0.1, 8)
    assert (config.optimizer.eps, config.sampling.max_tokens, config.batch_prompts) == (eps, tokens, prompts)
    schedule = Schedule.of(config)
    if isinstance(config.algorithm, GRPOConfig):
        assert (config.algorithm.kl_beta, config.algorithm.aggregation) == (0.001, "seq_mean_token_sum")
        assert schedule.ref_sync_every is None  # GRPO's KL reference: the seed
    else:
        assert isinstance(config.algorithm, DPOConfig) and config.algorithm.beta == beta
        synced = path.stem.startswith("numina-") and config.sync_every is not None
        assert schedule.ref_sync_every == (config.sync_every if synced else None)  # synced for math, else fixed
    assert path.read_text().startswith("# ") and "# Differs:" in path.read_text()


def test_every_paper_recipe_is_present() -> None:
    assert {p.stem.split("-")[0] for p in PAPER} == set(RECIPES) and len(PAPER) == 11
