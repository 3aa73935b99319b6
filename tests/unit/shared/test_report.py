"""The run report is rebuilt from the run folder's files alone, and copes with a run that stopped early."""

import json
from pathlib import Path

from cadence.app.report import write_report


def test_report_from_files(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("run_id: r1\ntasks:\n  - {name: t, dataset: toy}\n")
    rows = [
        {
            "step": i,
            "loss": 0.69 - i / 1000,
            "reward_mean": i / 100,
            "entropy": 0.2,
            "length_mean": 12.0,
            "staleness_mean": i % 4,
            "staleness_max": 3,
            "samples": 256,
            "step_time": 0.3,
            "time_wait": 0.2,
            "time_compute": 0.1,
            "time_publish": 0.01,
            "tokens_per_s": 1000.0,
            "pairs_kept": 20,
            "pairs_skipped": 12,
        }
        for i in range(80)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"dataset": "toy", "problems": 500, "samples": 1, "mean_length": 12.5}
    (tmp_path / "eval_before.json").write_text(json.dumps(summary | {"accuracy": 0.262}))
    (tmp_path / "eval_after.json").write_text(json.dumps(summary | {"accuracy": 0.608}))
    text = write_report(tmp_path).read_text()
    assert "26.2 %" in text and "60.8 %" in text and "+34.6 points" in text
    assert "not as RL beating SFT" in text  # the toy caveat
    assert "| steps | 80 |" in text and "| pairs kept / skipped | 1600 / 960 |" in text
    for name in ("loss", "reward_mean", "entropy", "length_mean", "staleness_mean"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_report_of_a_run_that_stopped_before_any_step(tmp_path: Path) -> None:
    text = write_report(tmp_path).read_text()
    assert "No evaluation was recorded" in text and "No training steps were recorded" in text
