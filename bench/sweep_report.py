"""bench.sweep's report: the lr × regime table with seed spread, the paper's ordering per learning rate,
semi-online against online per step and on wall-clock, time to a target taken from the online curve, how
answers end, and the plots. Rendered from the run records alone, so `--sweep --report` redoes it.
"""

from __future__ import annotations

import json

from bench._common import RESULTS
from bench._runs import load_average, mean_sem
from bench.sweep import ONLINE, Curve, Grid

OFFLINE = "offline DPO"
MATCH = 0.05
"""|semi-online − online| within which the paper's "close to online" counts as holding (5 points)."""


def cells(records: list[dict]) -> tuple[dict[tuple[str, float], list[Curve]], dict[tuple[str, float], list[float]]]:
    """Curves and final accuracies per (regime, lr), one per seed."""
    curves: dict[tuple[str, float], list[Curve]] = {}
    finals: dict[tuple[str, float], list[float]] = {}
    for rec in records:
        curves.setdefault((rec["label"], rec["lr"]), []).append([tuple(p) for p in rec["curve"]])
        finals.setdefault((rec["label"], rec["lr"]), []).append(rec["final"])
    return curves, finals


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


def ordering(finals: dict[tuple[str, float], list[float]], grid: Grid) -> dict[str, dict]:
    """Per learning rate: the regimes by mean final accuracy (mean, s.e. over seeds), whether offline DPO is
    the lowest and by more than the two standard errors together, and each regime's gap to online DPO with
    whether it is within `MATCH` — the paper's ordering offline < semi-online ≈ online ≈ GRPO, with spread."""
    out = {}
    for lr in grid.lrs:
        spread = {label: mean_sem(finals[(label, lr)]) for label, _, _ in grid.regimes if (label, lr) in finals}
        ranking = sorted(spread, key=lambda label: -spread[label][0])
        entry: dict = {"ranking": [[label, *spread[label]] for label in ranking]}
        if OFFLINE in spread:
            others = [label for label in spread if label != OFFLINE]
            entry["offline_lowest"] = all(spread[OFFLINE][0] < spread[o][0] for o in others)
            entry["offline_below_beyond_spread"] = all(
                spread[o][0] - spread[OFFLINE][0] > spread[o][1] + spread[OFFLINE][1] for o in others
            )
        if ONLINE in spread:
            entry["gap_to_online"] = {
                label: [spread[label][0] - spread[ONLINE][0], abs(spread[label][0] - spread[ONLINE][0]) <= MATCH]
                for label in spread
                if label not in (ONLINE, OFFLINE)
            }
        out[f"{lr:g}"] = entry
    return out


def ordering_lines(order: dict[str, dict]) -> list[str]:
    lines = []
    for lr, entry in order.items():
        ranked = " > ".join(f"{label} {100 * m:.1f} ± {100 * e:.1f}" for label, m, e in entry["ranking"])
        lines.append(f"- lr {lr}: {ranked}.")
        if "offline_lowest" in entry:
            beyond = "beyond the spread" if entry["offline_below_beyond_spread"] else "not beyond the spread of all"
            lines.append(f"  Offline lowest: {'yes' if entry['offline_lowest'] else 'no'} ({beyond}).")
        for label, (gap, match) in entry.get("gap_to_online", {}).items():
            verdict = "matches" if match else "does not match"
            lines.append(f"  {label} {verdict} online ({100 * gap:+.1f} points; within ±5 counts).")
    return lines


def ends_table(records: list[dict], grid: Grid) -> list[str]:
    """Mean length and the share of right answers ending with EOS over each run's last 5 steps."""
    lines = ["| regime | " + " | ".join(f"lr {lr:g}" for lr in grid.lrs) + " |", "|---|" + "---|" * len(grid.lrs)]
    for label, _, _ in grid.regimes:
        row = []
        for lr in grid.lrs:
            group = [r for r in records if r["label"] == label and r["lr"] == lr]
            length = mean_sem([r["length_tail"] for r in group if r["length_tail"] is not None])[0]
            eos = [r["eos_rate_correct_tail"] for r in group if r["eos_rate_correct_tail"] is not None]
            collapsed = sum(1 for r in group if (r["length_tail"] or 0) > 13.5)
            row.append(f"{length:.1f} / {100 * mean_sem(eos)[0]:.0f} % ({collapsed}/{len(group)} at the cap)")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def report(records: list[dict], grid: Grid) -> tuple[str, dict]:
    """sweep.md's text, and the summary sweep.json carries besides the records."""
    curves, finals = cells(records)
    best = best_lrs(finals, grid)
    order = ordering(finals, grid)
    measure = (
        "greedy held-out accuracy at each checkpoint"
        if grid.curves == "heldout"
        else "the generator's sampled training accuracy (T 1, 5-step running mean)"
    )
    online = mean_curve(curves[(ONLINE, best[ONLINE])]) if ONLINE in best else []
    target = max(p[2] for p in online) - 0.02 if online else float("nan")
    seed_acc = mean_sem([r["seed_accuracy"] for r in records])
    cells_expected = grid.seeds * len(grid.lrs) * len(grid.regimes)
    complete = len(records) == cells_expected
    lines = [
        f"# Regime × learning-rate sweep on the toy ({grid.steps} steps × 32 prompts × 8 samples, "
        f"{grid.seeds} seed(s); final: greedy held-out accuracy on {grid.problems} toy test problems)",
        *(
            []
            if complete
            else ["", f"**Partial: {len(records)} of {cells_expected} runs recorded; (n) = seeds in a cell.**"]
        ),
        "",
        f"2-core CPU sandbox; load average at the end {load_average()}; {grid.parallel} run(s) at once, cells "
        "interleaved per seed, so contention hits every regime alike. Seed model: "
        f"{100 * seed_acc[0]:.1f} %. Final held-out accuracy, mean ± standard error over seeds; in brackets the "
        f"best point of the mean curve after step 0 ({measure}), which the plots and the time to target use.",
        "",
        "| regime | " + " | ".join(f"lr {lr:g}" for lr in grid.lrs) + " | best lr |",
        "|---|" + "---|" * (len(grid.lrs) + 1),
    ]
    for label, _, _ in grid.regimes:
        row = []
        for lr in grid.lrs:
            final, sem = mean_sem(finals[(label, lr)])
            peak = max(p[2] for p in mean_curve(curves[(label, lr)]) if p[0] > 0)
            seeds = "" if len(finals[(label, lr)]) == grid.seeds else f" ({len(finals[(label, lr)])})"
            row.append(f"{100 * final:.1f} ± {100 * sem:.1f} [{100 * peak:.1f}]{seeds}")
        lines.append(f"| {label} | " + " | ".join(row) + f" | {best[label]:g} |")
    lines += ["", "The paper's ordering per learning rate (final accuracy, mean ± s.e.):", "", *ordering_lines(order)]
    lines += ["", "How answers end (last 5 steps: mean length / right answers ending with EOS):", ""]
    lines += ends_table(records, grid)
    lines += [
        "",
        f"Time to {100 * target:.1f} % on the curves (online DPO's best mean point at lr {best.get(ONLINE, 0):g} "
        "− 2 points), each regime at its best lr; training wall-clock summed from the trainer's step times "
        "(mean over seeds that reached it); s/step is the mean over the whole run:",
        "",
    ]
    summary = {"best_lr": best, "target": target, "ordering": order, "time_to_target": {}, "seconds_per_step": {}}
    for label, _, _ in grid.regimes:
        group = [r for r in records if r["label"] == label and r["lr"] == best[label]]
        per_step = mean_sem([r["train_seconds"] / grid.steps for r in group])
        reached = time_to_target(curves[(label, best[label])], target)
        summary["time_to_target"][label] = reached
        summary["seconds_per_step"][label] = per_step
        lines.append(f"- {label} (lr {best[label]:g}): {reached}; {per_step[0]:.2f} ± {per_step[1]:.2f} s/step")
    lines += ["", *(f"![{name}]({name})" for name in plot(curves, grid, best)), ""]
    return "\n".join(lines), summary


def write_report(records: list[dict], grid: Grid) -> str:
    """sweep.md, sweep.json (grid, summary with the ordering and its spread, every run's record) and plots."""
    md, summary = report(records, grid)
    RESULTS.mkdir(parents=True, exist_ok=True)
    setup = {"steps": grid.steps, "seeds": grid.seeds, "lrs": list(grid.lrs), "problems": grid.problems}
    setup["runs_recorded"] = len(records)
    payload = {"grid": setup, "summary": summary, "runs": records}
    (RESULTS / "sweep.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "sweep.md").write_text(md)
    return md
