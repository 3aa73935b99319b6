"""End to end on CPU: `cadence run` with the tiny model and every real service, a few steps per regime.

Each run asserts what the design promises: the cadence rule held at every step (the versions that
generated each step's samples), every prompt was scored and trained on exactly once, the report and its
files were written, and no process was left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

REGIMES = {
    "offline-dpo": ("toy-offline-dpo.yaml", []),
    "semi-online-dpo-s2": ("toy-semi-online-dpo.yaml", ["sync_every=2"]),
    "online-dpo": ("toy-online-dpo.yaml", []),
    "grpo": ("toy-grpo.yaml", []),
    "rm-dpo": ("toy-chat-rm-dpo.yaml", []),
    "mixed": ("toy-mixed.yaml", []),
}
SMALL = ["steps=4", "batch_prompts=4", "sampling.n=4", "eval.max_problems=20", "inference.engine=hf"]
WITH_RM = {"rm-dpo", "mixed"}
"""Regimes whose config names `tiny-rm`: they score with a random RM of the same layout instead, because these
runs test the pipeline, and building tiny-rm (its SFT and Bradley-Terry steps) takes minutes on 2 cores."""


def run_cadence(config: str, overrides: list[str], runs_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    args = [sys.executable, "-m", "cadence.app.cli", "run", str(REPO / "configs" / config), "--runs-dir", str(runs_dir)]
    for override in [*SMALL, *overrides]:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    run_dirs = sorted(runs_dir.iterdir())
    assert len(run_dirs) == 1, result.stdout + result.stderr
    return result, run_dirs[0]


def expected_version(step: int, sync_every: int | None) -> int:
    return 0 if sync_every is None else sync_every * (step // sync_every)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("regime", list(REGIMES))
def test_local_run(regime: str, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest) -> None:
    config, overrides = REGIMES[regime]
    if regime in WITH_RM:
        overrides = [*overrides, f"reward_model={request.getfixturevalue('random_rm_dir')}"]
    before = {p.pid for p in psutil.process_iter()}
    result, run_dir = run_cadence(config, overrides, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    sync_every = resolved["sync_every"]
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    assert [row["step"] for row in ledger] == list(range(resolved["steps"]))
    seen: set[str] = set()
    for row in ledger:
        assert set(row["policy_versions"]) == {expected_version(row["step"], sync_every)}, row
        assert len(row["prompt_ids"]) == resolved["batch_prompts"]
        assert not seen & set(row["prompt_ids"]), "a prompt was trained on twice"
        seen |= set(row["prompt_ids"])
        assert row["samples"] == resolved["batch_prompts"] * resolved["sampling"]["n"]

    for name in ("report.md", "metrics.jsonl", "eval_before.json", "eval_after.json", "plots/loss.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "final" / "config.json").exists()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before and _is_ours(p, run_dir)]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


def _is_ours(process: psutil.Process, run_dir: Path) -> bool:
    """A process of this run: the launcher gives every child the run's id (redis gets the run folder)."""
    try:
        cmdline = " ".join(process.info["cmdline"] or [])
        return str(run_dir) in cmdline or process.environ().get("CADENCE_RUN_ID") == run_dir.name
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
