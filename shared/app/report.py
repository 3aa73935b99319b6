"""A run's report: `runs/<run_id>/report.md` with the config, before/after evaluation, throughput, and plots.

Reads only files in the run folder (config.yaml, metrics.jsonl, eval_before.json, eval_after.json), so
`cadence report RUN_DIR` regenerates it at any time, even for a run that stopped early.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

PLOTS = {
    "reward_mean": "mean reward",
    "accuracy": "train accuracy",
    "entropy": "token entropy (nats)",
    "length_mean": "response length (tokens)",
    "staleness_mean": "staleness (steps)",
    "loss": "loss",
}
TOY_CAVEAT = (
    "**Read this as a demonstration of the machinery, not as RL beating SFT.** Continued supervised "
    "fine-tuning of the same seed also solves this toy addition task (~90 % in ~20 s on one CPU thread). "
    "What the toy shows is that the pipeline works end to end and how the regimes (offline, semi-online, "
    "online) differ; single seeds are noisy — run several before drawing conclusions about the ordering."
)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def plot_metrics(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per metric that the rows carry, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in PLOTS.items():
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        steps, values = [p[0] for p in points], [p[1] for p in points]
        noisy = len(points) >= 60
        ax.plot(steps, values, marker=None if noisy else ".", alpha=0.35 if noisy else 1.0, label="per step")
        if noisy:  # a trailing mean makes the trend readable through per-step noise
            window = max(5, len(points) // 25)
            smooth = [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, label=f"mean of last {window}")
            ax.legend(loc="best", fontsize="small")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _eval_table(before: dict | None, after: dict | None) -> list[str]:
    if not before and not after:
        return ["_No evaluation was recorded._"]
    lines = ["| model | dataset | problems | k | accuracy | mean length |", "|---|---|---|---|---|---|"]
    for name, result in (("seed (before)", before), ("trained (after)", after)):
        if result:
            lines.append(
                f"| {name} | {result['dataset']} | {result['problems']} | {result['samples']} | "
                f"{100 * result['accuracy']:.1f} % | {result['mean_length']:.1f} |"
            )
    if before and after:
        delta = 100 * (after["accuracy"] - before["accuracy"])
        lines.append(f"\n**Change: {delta:+.1f} points.**")
    return lines


def _throughput(rows: list[dict]) -> list[str]:
    if not rows:
        return ["_No training steps were recorded._"]

    def mean(key: str) -> float:
        values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
        return statistics.fmean(values) if values else float("nan")

    samples = sum(row.get("samples", 0) for row in rows)
    return [
        "| figure | value |",
        "|---|---|",
        f"| steps | {len(rows)} |",
        f"| samples trained on | {samples} |",
        f"| mean step time | {mean('step_time'):.2f} s |",
        f"| waiting for data | {mean('time_wait'):.2f} s/step |",
        f"| compute | {mean('time_compute'):.2f} s/step |",
        f"| publishing weights | {mean('time_publish'):.3f} s/step |",
        f"| training tokens/s | {mean('tokens_per_s'):.0f} |",
        f"| staleness (mean / max) | {mean('staleness_mean'):.2f} / {max(r.get('staleness_max', 0) for r in rows)} |",
        f"| pairs kept / skipped | {sum(r.get('pairs_kept', 0) for r in rows)} / "
        f"{sum(r.get('pairs_skipped', 0) for r in rows)} |",
        f"| rollouts rejected by the cadence rule | {sum(r.get('rejected_rollouts', 0) for r in rows)} |",
    ]


def write_report(run_dir: Path) -> Path:
    """Write `report.md` and `plots/*.png` for the run in `run_dir`; return the report's path."""
    run_dir = Path(run_dir)
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    config = yaml.safe_load(config_text) or {}
    rows = read_jsonl(run_dir / "metrics.jsonl")
    plots = plot_metrics(rows, run_dir / "plots")
    before, after = _read_json(run_dir / "eval_before.json"), _read_json(run_dir / "eval_after.json")
    lines = [f"# Run {config.get('run_id', run_dir.name)}", ""]
    lines += ["## Evaluation (held out)", "", *_eval_table(before, after), ""]
    if any(task.get("dataset") == "toy" for task in config.get("tasks", [])):
        lines += [TOY_CAVEAT, ""]
    lines += ["## Throughput", "", *_throughput(rows), ""]
    if plots:
        lines += ["## Training dynamics", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
        lines.append("")
    lines += ["## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
