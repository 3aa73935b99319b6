"""Where the paper's claims hold on the toy: learning rate × regime (offline, s = 16, 4, 1) + GRPO, over seeds.

`python -m bench.paper --sweep` runs it (`make bench` keeps the 30-minute Table 1). Every cell is a real
`cadence run` from the same tiny seed with the same prompts per seed; cells run seed-major and, within a
seed, interleaved over regimes and learning rates, so machine load hits every regime alike. Each run saves
`checkpoints` checkpoints; each is evaluated afterwards (greedy, `problems` held-out toy test problems, one
HF engine, weights swapped in); its wall-clock is the sum of the trainer's step times up to it (service
start-up excluded, the same for every regime), which includes waiting for generation: the pipeline overlap
semi-online allows shows there.

Time to accuracy: per regime its best learning rate (highest mean final accuracy); target = the online DPO
curve's best mean accuracy (at its best lr) minus 2 points; per seed the first checkpoint at or above it.

Budget (full, the defaults): 3 lr (5e-4, 1.5e-4, 5e-5: 10×) × 5 regimes × 3 seeds = 45 runs of 80 steps,
sized to about an hour on 2 quiet cores (≈0.45 s per step + ~35 s of start-up and before/after evaluation +
5 checkpoint evals per run); measured 2026-12-02 on the shared sandbox (load 5-11) a run took ~3 min, so
there the grid takes ~2 h 15 min: stop it and go on with `--resume`. On quieter cores (load 1.3-2.9, other
benchmarks kept off by a lock) 19 runs took about 25 min (~80 s a run), so the grid fits the hour.
Each finished run is appended to
bench/results/sweep_runs.jsonl (its curve and folder), so `--report` re-renders sweep.md, sweep.json (cells,
ordering with seed spread) and sweep_*.png from it without re-running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bench._common import RESULTS
from bench._runs import Run, run_many

LRS = (5e-4, 1.5e-4, 5e-5)
REGIMES = [
    ("offline DPO", "toy-offline-dpo", []),
    ("semi-online s = 16", "toy-semi-online-dpo", ["sync_every=16", "strict_format=false"]),
    ("semi-online s = 4", "toy-semi-online-dpo", ["sync_every=4", "strict_format=false"]),
    ("online DPO (s = 1)", "toy-online-dpo", []),
    ("GRPO", "toy-grpo", []),
]
ONLINE = "online DPO (s = 1)"

Curve = list[tuple[int, float, float]]
"""(step, training seconds up to it, held-out accuracy)."""


@dataclass
class Grid:
    steps: int = 80
    seeds: int = 3
    lrs: tuple[float, ...] = LRS
    regimes: list = field(default_factory=lambda: list(REGIMES))
    checkpoints: int = 5
    problems: int = 200
    parallel: int = 1
    """Runs at once; they slow each other alike (cells are interleaved), and the report says how many."""
    curves: str = "heldout"
    """`heldout`: greedy held-out accuracy at each checkpoint; `train`: the generator's sampled accuracy per
    step (T 1, 256 samples; a 5-step running mean) — free, where checkpoint evals cost more than the runs."""

    def overrides(self, seed: int, lr: float) -> list[str]:
        return [
            f"steps={self.steps}",
            f"seed={seed}",
            f"optimizer.lr={lr}",
            f"checkpoint_every={max(1, self.steps // self.checkpoints) if self.curves == 'heldout' else 0}",
            f"keep_checkpoints={self.checkpoints + 2}",
            f"eval.max_problems={self.problems}",
        ]


RECORDS = RESULTS / "sweep_runs.jsonl"


def run_grid(grid: Grid, resume: bool = False) -> list[dict]:
    """Every run of the grid, one record each (also appended to `RECORDS` as it finishes). `resume`: keep
    the records `RECORDS` already holds for this grid's cells and step count, and run only the rest (a sweep
    stopped part-way, on cores too busy for it to finish in one sitting, goes on where it stopped)."""
    jobs, keys = [], []
    for seed in range(grid.seeds):
        for lr in grid.lrs:
            for label, config, extra in grid.regimes:
                slug = "sw-" + "".join(c if c.isalnum() else "-" for c in label.lower())[:16] + f"-{lr:g}"
                jobs.append((slug, config, grid.overrides(seed, lr) + extra))
                keys.append((label, lr, seed))
    RESULTS.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_records() if _same_cell(r, grid, keys)] if resume and RECORDS.exists() else []
    if not resume:
        RECORDS.write_text("")  # a resumed sweep appends, keeping records outside a narrowed grid too
    have = {(r["label"], r["lr"], r["seed"]) for r in kept}
    todo = [i for i, key in enumerate(keys) if key not in have]
    records: dict[int, dict] = {}

    def done(index: int, run: Run) -> None:
        records[index] = record_of(run, grid, *keys[todo[index]])
        with RECORDS.open("a") as handle:
            handle.write(json.dumps(records[index]) + "\n")

    run_many([jobs[i] for i in todo], grid.parallel, done)
    return kept + [records[i] for i in sorted(records)]


def _same_cell(record: dict, grid: Grid, keys: list[tuple[str, float, int]]) -> bool:
    """Whether a stored record is one of this grid's runs (its cell, seed and step count)."""
    return (record["label"], record["lr"], record["seed"]) in keys and record["curve"][-1][0] == grid.steps


def read_records() -> list[dict]:
    """The records the last `run_grid` appended to `RECORDS`."""
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line]


def record_of(run: Run, grid: Grid, label: str, lr: float, seed: int) -> dict:
    """A run's curve, final accuracy and how its answers end (the last 5 steps), for the report."""
    tail = run.metrics[-5:]

    def tail_mean(key: str) -> float | None:
        values = [m[key] for m in tail if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    curve = held_out_curve(run, grid, seed) if grid.curves == "heldout" else train_curve(run)
    return {
        "label": label,
        "lr": lr,
        "seed": seed,
        "folder": str(run.folder),
        "curve": curve,
        "final": run.after["accuracy"],
        "seed_accuracy": run.before["accuracy"],
        "train_seconds": sum(m["step_time"] for m in run.metrics),
        "length_tail": tail_mean("length_mean"),
        "eos_rate_correct_tail": tail_mean("eos_rate_correct"),
    }


def train_curve(run: Run, window: int = 5) -> Curve:
    """The generator's sampled accuracy per step (running mean over `window` steps), with training seconds."""
    seconds, curve, accuracies = 0.0, [], []
    for metric in run.metrics:
        seconds += metric["step_time"]
        accuracies.append(metric["accuracy"])
        if len(accuracies) >= window:
            curve.append((metric["step"] + 1, seconds, sum(accuracies[-window:]) / window))
    return curve


def held_out_curve(run: Run, grid: Grid, seed: int) -> Curve:
    """Greedy held-out accuracy at the seed, each checkpoint and the end, with training seconds; on the
    problems the run's own evaluations drew (they depend on the run's seed)."""
    import torch

    from cadence.app.evaluation import load_eval_problems
    from cadence.app.wiring import math_accuracy, open_sampler

    times = [0.0]
    for metric in run.metrics:
        times.append(times[-1] + metric["step_time"])
    problems = load_eval_problems("toy", "test", grid.problems, seed=seed)
    curve = [(0, 0.0, run.before["accuracy"])]
    folders = sorted((run.folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    with open_sampler("hf", run.folder / "final") as sampler:
        for folder in folders:
            step = int(folder.name.split("-")[1])
            if not 0 < step < grid.steps:
                continue
            state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
            sampler.engine.load_weights(state["module"].items(), step)
            summary = math_accuracy(sampler, problems, samples=1, temperature=0.0, top_p=1.0, max_tokens=14)
            curve.append((step, times[step], summary.accuracy))
    curve.append((grid.steps, times[-1], run.after["accuracy"]))
    return curve
