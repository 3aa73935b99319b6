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

Budget (full, the defaults): 4 lr × 5 regimes × 3 seeds = 60 runs of 120 steps; about 45-60 min on 2 quiet
cores (≈0.3 s per step + ~15 s start-up + checkpoint evals per run). Writes bench/results/sweep.md,
sweep.json and sweep_*.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bench._common import RESULTS
from bench._runs import Run, load_average, mean_sem, run_many

LRS = (5e-4, 2e-4, 1e-4, 5e-5)
REGIMES = [
    ("offline DPO", "toy-offline-dpo", []),
    ("semi-online s = 16", "toy-semi-online-dpo", ["sync_every=16"]),
    ("semi-online s = 4", "toy-semi-online-dpo", ["sync_every=4"]),
    ("online DPO (s = 1)", "toy-online-dpo", []),
    ("GRPO", "toy-grpo", []),
]
ONLINE = "online DPO (s = 1)"

Curve = list[tuple[int, float, float]]
"""(step, training seconds up to it, held-out accuracy)."""


@dataclass
class Grid:
    steps: int = 120
    seeds: int = 3
    lrs: tuple[float, ...] = LRS
    regimes: list = field(default_factory=lambda: list(REGIMES))
    checkpoints: int = 6
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
            f"eval.max_problems={self.problems}",
        ]


def run_grid(grid: Grid) -> tuple[dict[tuple[str, float], list[Curve]], dict[tuple[str, float], list[float]]]:
    """Every cell's curves and final held-out greedy accuracies, one per seed."""
    jobs, keys = [], []
    for seed in range(grid.seeds):
        for lr in grid.lrs:
            for label, config, extra in grid.regimes:
                slug = "sw-" + "".join(c if c.isalnum() else "-" for c in label.lower())[:16] + f"-{lr:g}"
                jobs.append((slug, config, grid.overrides(seed, lr) + extra))
                keys.append((label, lr))
    curves: dict[tuple[str, float], list[Curve]] = {}
    finals: dict[tuple[str, float], list[float]] = {}
    for key, run in zip(keys, run_many(jobs, grid.parallel), strict=True):
        curves.setdefault(key, []).append(held_out_curve(run, grid) if grid.curves == "heldout" else train_curve(run))
        finals.setdefault(key, []).append(run.after["accuracy"])
    return curves, finals


def train_curve(run: Run, window: int = 5) -> Curve:
    """The generator's sampled accuracy per step (running mean over `window` steps), with training seconds."""
    seconds, curve, accuracies = 0.0, [], []
    for metric in run.metrics:
        seconds += metric["step_time"]
        accuracies.append(metric["accuracy"])
        if len(accuracies) >= window:
            curve.append((metric["step"] + 1, seconds, sum(accuracies[-window:]) / window))
    return curve


def held_out_curve(run: Run, grid: Grid) -> Curve:
    """Greedy held-out accuracy at the seed, each checkpoint and the end, with training seconds."""
    import torch

    from cadence.app.evaluation import load_eval_problems
    from cadence.app.wiring import math_accuracy, open_sampler

    times = [0.0]
    for metric in run.metrics:
        times.append(times[-1] + metric["step_time"])
    problems = load_eval_problems("toy", "test", grid.problems, seed=0)
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


def mean_curve(curves: list[Curve]) -> list[tuple[int, float, float, float]]:
    """(step, mean seconds, mean accuracy, its standard error) over seeds, at the checkpoints all share."""
    steps = sorted(set.intersection(*({s for s, _, _ in c} for c in curves)))
    out = []
    for step in steps:
        points = [next(p for p in c if p[0] == step) for c in curves]
        acc, sem = mean_sem([p[2] for p in points])
        out.append((step, mean_sem([p[1] for p in points])[0], acc, sem))
    return out


def best_lrs(finals: dict[tuple[str, float], list[float]], grid: Grid) -> dict[str, float]:
    """Each regime's learning rate with the highest mean final held-out accuracy."""
    return {label: max(grid.lrs, key=lambda lr: mean_sem(finals[(label, lr)])[0]) for label, _, _ in grid.regimes}


def first_reaching(curve: Curve, target: float) -> tuple[int, float] | None:
    """(steps, training seconds) of the first checkpoint (the seed excluded) at or above `target`."""
    return next(((s, t) for s, t, a in curve if s > 0 and a >= target), None)


def time_to_target(group: list[Curve], target: float) -> str:
    hits = [first_reaching(c, target) for c in group]
    reached = [h for h in hits if h is not None]
    if not reached:
        return f"not reached (0/{len(group)})"
    steps, seconds = mean_sem([float(h[0]) for h in reached]), mean_sem([h[1] for h in reached])
    return f"{steps[0]:.0f} ± {steps[1]:.0f} steps, {seconds[0]:.0f} ± {seconds[1]:.0f} s ({len(reached)}/{len(group)})"


def plot(curves: dict[tuple[str, float], list[Curve]], grid: Grid, best: dict[str, float]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, len(grid.lrs), figsize=(4.2 * len(grid.lrs), 3.6), sharey=True, squeeze=False)
    for axis, lr in zip(axes[0], grid.lrs, strict=True):
        for index, (label, _, _) in enumerate(grid.regimes):
            points = mean_curve(curves[(label, lr)])
            axis.errorbar([p[0] for p in points], [100 * p[2] for p in points], [100 * p[3] for p in points],
                          color=f"C{index}", label=label, capsize=2)  # fmt: skip
        axis.set(title=f"lr {lr:g}", xlabel="optimizer step")
    axes[0][0].set(ylabel="held-out accuracy (%), mean ± s.e.")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sweep_steps.png", dpi=100)
    plt.close(fig)
    names.append("sweep_steps.png")
    fig, axis = plt.subplots(figsize=(6, 4))
    for index, (label, _, _) in enumerate(grid.regimes):
        for seed, curve in enumerate(curves[(label, best[label])]):
            name = f"{label} (lr {best[label]:g})" if seed == 0 else None
            axis.plot([p[1] for p in curve], [100 * p[2] for p in curve], color=f"C{index}", alpha=0.6, label=name)
    axis.set(xlabel="training wall-clock (s)", ylabel="held-out accuracy (%)", title="each regime at its best lr")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sweep_wallclock.png", dpi=100)
    plt.close(fig)
    names.append("sweep_wallclock.png")
    return names


def report(
    curves: dict[tuple[str, float], list[Curve]], finals: dict[tuple[str, float], list[float]], grid: Grid
) -> str:
    best = best_lrs(finals, grid)
    measure = (
        "greedy held-out accuracy at each checkpoint"
        if grid.curves == "heldout"
        else "the generator's sampled training accuracy (T 1, 5-step running mean)"
    )
    online = mean_curve(curves[(ONLINE, best[ONLINE])]) if ONLINE in best else []
    target = max(p[2] for p in online) - 0.02 if online else float("nan")
    lines = [
        f"# Regime × learning-rate sweep on the toy ({grid.steps} steps × 32 prompts × 8 samples, "
        f"{grid.seeds} seed(s); final: greedy held-out accuracy on {grid.problems} toy test problems)",
        "",
        f"2-core CPU sandbox; load average at the end {load_average()}; {grid.parallel} run(s) at once, cells "
        "interleaved per seed, so contention hits every regime alike. "
        f"Final held-out accuracy, mean ± standard error over seeds; in brackets the best point of the curve "
        f"({measure}), which the plots and the time to target use.",
        "",
        "| regime | " + " | ".join(f"lr {lr:g}" for lr in grid.lrs) + " | best lr |",
        "|---|" + "---|" * (len(grid.lrs) + 1),
    ]
    for label, _, _ in grid.regimes:
        cells = []
        for lr in grid.lrs:
            final, sem = mean_sem(finals[(label, lr)])
            peak = max(p[2] for p in mean_curve(curves[(label, lr)]))
            cells.append(f"{100 * final:.1f} ± {100 * sem:.1f} [{100 * peak:.1f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best[label]:g} |")
    lines += [
        "",
        f"Time to {100 * target:.1f} % on the curves (online DPO's best mean point at lr {best.get(ONLINE, 0):g} "
        "− 2 points), "
        "each regime at its best lr, training wall-clock summed from the trainer's step times:",
        "",
    ]
    for label, _, _ in grid.regimes:
        lines.append(f"- {label} (lr {best[label]:g}): {time_to_target(curves[(label, best[label])], target)}")
    lines += ["", *(f"![{name}]({name})" for name in plot(curves, grid, best)), ""]
    return "\n".join(lines)


def run_sweep(grid: Grid) -> str:
    curves, finals = run_grid(grid)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = {
        f"{label} @ {lr:g}": {"curves": group, "final": finals[(label, lr)]} for (label, lr), group in curves.items()
    }
    (RESULTS / "sweep.json").write_text(json.dumps(cells, indent=1))
    md = report(curves, finals, grid)
    (RESULTS / "sweep.md").write_text(md)
    return md
