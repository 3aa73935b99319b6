"""The paper's Table 1 in miniature: every regime from the same tiny seed on the toy addition task.

Each regime is a real `cadence run` with the same seed model, prompts (per seed), optimizer steps and
samples per step (32 prompts × 8): offline DPO, semi-online DPO (s = 4 and 16), online DPO and GRPO,
repeated over seeds (mean ± standard error); then, once each, online DPO without reference sync, the
tiny-RM-scored run and the mixed run. Held-out accuracy: k samples per problem on the toy test split.

Time to accuracy: the runs save a checkpoint every `steps / 4` steps; for seed 0 each checkpoint is
evaluated afterwards (one HF engine, weights swapped in), and its wall-clock is the sum of the trainer's
step times up to it (service start-up excluded, the same for every regime). The target is online DPO's
final accuracy minus 2 points. Evaluating checkpoints afterwards costs a few seconds each, where
re-running each regime at several step budgets would multiply the runs.

Run: `.venv/bin/python -m bench.paper [--quick]` (full ~24 min, --quick ~2.5 min on 2 cores).
Writes bench/results/paper.md, paper.json and PNGs. `--sweep`: the learning-rate × regime sweep of
bench/sweep.py instead (~1 h; `--steps/--seeds/--lrs/--regimes` narrow it; `--sweep --report` re-renders the
last sweep's report from its run records). `--rm`: the paper's Table 3 instead: verifier-only, tiny-RM-only
and mixed semi-online runs, each judged on toy math accuracy and on tiny-RM win rate against the seed
(writes paper_rm.md; 3 runs × 80 steps at lr 1.5e-4 per seed, ~10 min a seed; `--seeds 3` for the spread).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import RESULTS, print_table, record, row
from bench._runs import Run, cadence_run, load_average, mean_sem

MAIN = [
    ("offline DPO", "toy-offline-dpo", []),
    ("semi-online DPO (s = 4)", "toy-semi-online-dpo", ["sync_every=4", "strict_format=false"]),
    ("semi-online DPO (s = 16)", "toy-semi-online-dpo", ["sync_every=16", "strict_format=false"]),
    ("online DPO", "toy-online-dpo", []),
    ("GRPO", "toy-grpo", []),
]
EXTRAS = [
    ("online DPO, no reference sync", "toy-online-dpo", ["ref_sync_every=null"]),
    ("semi-online DPO (s = 4), tiny-RM rewards", "toy-chat-rm-dpo", []),
    ("mixed: verifier + tiny RM (s = 4)", "toy-mixed", []),
]
RM_LR = 1.5e-4
"""`--rm`'s learning rate: the sweep's best for s = 4. At the configs' 5e-4 every row was still in its early dip
at 40 steps (verifier-only 25.1 -> 18.6 %, mixed 16.1 %), which says nothing about the reward."""
RM_ROWS = [
    (label, config, [*extra, f"optimizer.lr={RM_LR}"])
    for label, config, extra in [
        ("verifier only (s = 4)", "toy-semi-online-dpo", ["sync_every=4", "strict_format=false"]),
        *EXTRAS[1:],
    ]
]
"""`--rm`: the paper's Table 3 in miniature, each row judged on toy math and on tiny-RM win rate."""


@dataclass
class Setup:
    steps: int
    seeds: int
    problems: int
    k: int
    regimes: list = field(default_factory=list)
    extras: list = field(default_factory=list)

    def overrides(self, seed: int) -> list[str]:
        return [
            f"steps={self.steps}",
            f"seed={seed}",
            f"checkpoint_every={max(1, self.steps // 4)}",
            "keep_checkpoints=5",
            f"eval.max_problems={self.problems}",
            f"eval.samples={self.k}",
            "eval.temperature=0.6",
            "eval.top_p=0.9",
        ]


def run_all(setup: Setup) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {}
    for seed in range(setup.seeds):
        for label, config, extra in setup.regimes:
            print(f"-- {label}, seed {seed}", flush=True)
            runs.setdefault(label, []).append(cadence_run(_slug(label), config, setup.overrides(seed) + extra))
    for label, config, extra in setup.extras:
        print(f"-- {label}, seed 0", flush=True)
        runs[label] = [cadence_run(_slug(label), config, setup.overrides(0) + extra)]
    return runs


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:30].strip("-")


def accuracy_curve(run: Run, setup: Setup) -> list[tuple[int, float, float]]:
    """(step, wall-clock seconds of training up to it, held-out accuracy) at the seed, each checkpoint and the end."""
    import torch

    from cadence.app.evaluation import load_eval_problems
    from cadence.app.wiring import math_accuracy, open_sampler

    times = [0.0]
    for metric in run.metrics:
        times.append(times[-1] + metric["step_time"])
    problems = load_eval_problems("toy", "test", setup.problems, seed=0)
    curve = [(0, 0.0, run.before["accuracy"])]
    folders = sorted((run.folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    with open_sampler("hf", run.folder / "final") as sampler:
        for folder in folders:
            step = int(folder.name.split("-")[1])
            if step >= setup.steps:
                continue
            state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
            sampler.engine.load_weights(state["module"].items(), step)
            summary = math_accuracy(sampler, problems, samples=setup.k, temperature=0.6, top_p=0.9, max_tokens=14)
            curve.append((step, times[step], summary.accuracy))
    curve.append((setup.steps, times[-1], run.after["accuracy"]))
    return curve


def rm_win_rate(run: Run, setup: Setup) -> tuple[float, float | None]:
    """(win rate, length-normalised reward) of the run's final model against the seed's answers on held-out
    toy chat prompts, judged by tiny-RM — the reward model it trained on (so reward hacking shows as a high
    win rate with a falling math accuracy)."""
    from cadence.app.evaluation import evaluate_chat, load_eval_problems
    from cadence.app.wiring import baseline_answers, open_sampler, reward_model

    problems = load_eval_problems("toy", "test", setup.problems, seed=0, kind="chat")
    seed_answers = baseline_answers(problems, "tiny", "hf", 0.6, 0.9, 14)
    with open_sampler("hf", run.folder / "final") as sampler:
        summary = evaluate_chat(sampler, problems, reward_model("tiny-rm"), seed_answers, max_tokens=14)
    return summary.accuracy, summary.length_normalized_reward


def seed_accuracy(runs: dict[str, list[Run]]) -> tuple[float, float]:
    """The seed's held-out accuracy (mean, standard error) as the first regime's runs measured it."""
    return mean_sem([r.before["accuracy"] for r in next(iter(runs.values()))])


def rm_table(runs: dict[str, list[Run]], wins: dict[str, list[float]], setup: Setup) -> str:
    """`--rm`'s markdown: per row, math accuracy and tiny-RM win rate against the seed (mean ± s.e. over seeds)."""
    import json

    from cadence.models.cache import MARKER
    from cadence.models.registry import resolve_model

    built = json.loads((resolve_model("tiny-rm") / MARKER).read_text())
    seed_acc, seed_sem = seed_accuracy(runs)
    lines = [
        f"# The paper's Table 3 in miniature (toy addition; {setup.steps} steps at lr {RM_LR:g}, "
        f"{setup.seeds} seed(s))",
        "",
        f"Math: held-out accuracy on {setup.problems} toy test problems, k = {setup.k} (T 0.6, top-p 0.9). Win rate: "
        f"the final model's answers against the seed's on {setup.problems} held-out toy chat prompts, judged by "
        f"tiny-RM (a tie counts half, so the seed against itself expects 50 %). tiny-RM's held-out pairwise accuracy: "
        f"{100 * built['pairwise_accuracy']['all']:.1f} % overall, {100 * built['pairwise_accuracy']['wrong']:.1f} % "
        f"on wrong sums. Load average at the end: {load_average()}.",
        "",
        "| Training | toy math acc. (%) | Δ vs seed | tiny-RM win rate vs seed (%) |",
        "|---|---|---|---|",
        f"| Seed | {100 * seed_acc:.1f} ± {100 * seed_sem:.1f} | – | – |",
    ]
    for label, group in runs.items():
        acc, sem = mean_sem([r.after["accuracy"] for r in group])
        win, win_sem = mean_sem(wins[label])
        lines.append(
            f"| {label} | {100 * acc:.1f} ± {100 * sem:.1f} | {100 * (acc - seed_acc):+.1f} "
            f"| {100 * win:.1f} ± {100 * win_sem:.1f} |"
        )
    return "\n".join(lines) + "\n"


def rm_main(setup: Setup) -> None:
    """`--rm`: verifier-only, RM-only and mixed runs from one seed; writes bench/results/paper_rm.md."""
    runs = run_all(setup)
    wins = {label: [rm_win_rate(run, setup)[0] for run in group] for label, group in runs.items()}
    md = rm_table(runs, wins, setup)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "paper_rm.md").write_text(md)
    print(md)
    rows = []
    for label, group in runs.items():
        rows += [row(f"{label}: held-out accuracy", mean_sem([r.after["accuracy"] for r in group])[0], None, "ratio")]
        rows += [row(f"{label}: tiny-RM win rate vs seed", mean_sem(wins[label])[0], None, "ratio")]
    print_table(rows)
    print(f"recorded in {record('paper_rm', rows)}")


def first_reaching(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds to the first checkpoint (the seed itself excluded) at or above `target`."""
    return next((seconds for step, seconds, accuracy in curve if step > 0 and accuracy >= target), None)


def plot(runs: dict[str, list[Run]], labels: list[str], name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        run = runs[label][0]
        steps = [m["step"] for m in run.metrics]
        axes[0].plot(steps, [m.get("entropy") or float("nan") for m in run.metrics], label=label)
        axes[1].plot(steps, [m["length_mean"] for m in run.metrics], label=label)
    axes[0].set(xlabel="step", ylabel="token entropy (nats)", title="entropy")
    axes[1].set(xlabel="step", ylabel="mean response length (tokens)", title="length")
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(runs: dict[str, list[Run]], setup: Setup, reached: dict[str, float | None], target: float) -> str:
    """Markdown shaped like the paper's Table 1 (one benchmark: the toy test split)."""
    seed_acc, seed_sem = seed_accuracy(runs)
    lines = [
        f"# The paper's Table 1 in miniature (toy addition, tiny seed; {setup.steps} steps × 32 prompts × 8 samples)",
        "",
        f"Held-out accuracy on {setup.problems} toy test problems, k = {setup.k} samples each (T 0.6, top-p 0.9); "
        f"mean ± standard error over {setup.seeds} seed(s) for the main regimes, one seed for the rest. "
        f"Time to target: training wall-clock to first reach {100 * target:.1f} % (online DPO's final − 2 points), "
        f"checked every {max(1, setup.steps // 4)} steps on seed 0. Load average at the end: {load_average()}.",
        "",
        "| Training | toy test acc. (%) | Δ vs seed | entropy (last 5 steps) | length (last 5) "
        "| train wall-clock (s) | time to target (s) |",
        "|---|---|---|---|---|---|---|",
        f"| Seed | {100 * seed_acc:.1f} ± {100 * seed_sem:.1f} | – | – | – | – | – |",
    ]
    for label, group in runs.items():
        acc, sem = mean_sem([r.after["accuracy"] for r in group])
        entropy, _ = mean_sem([_tail(r, "entropy") for r in group])
        length, _ = mean_sem([_tail(r, "length_mean") for r in group])
        wall, _ = mean_sem([sum(r.series("step_time")) for r in group])
        to_target = reached.get(label)
        shown = "–" if label not in reached else ("not reached" if to_target is None else f"{to_target:.0f}")
        lines.append(
            f"| {label} | {100 * acc:.1f} ± {100 * sem:.1f} | {100 * (acc - seed_acc):+.1f} | {entropy:.3f} "
            f"| {length:.1f} | {wall:.0f} | {shown} |"
        )
    return "\n".join(lines) + "\n"


def _tail(run: Run, key: str) -> float:
    values = run.series(key)[-5:]
    return sum(values) / len(values) if values else float("nan")


def ordering(runs: dict[str, list[Run]]) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Final accuracies (mean, standard error over seeds) per regime, and where the paper's ordering did not
    hold (each note with the two regimes' standard errors, so a gap within the spread reads as such)."""
    spread = {label: mean_sem([r.after["accuracy"] for r in group]) for label, group in runs.items()}
    acc = {label: mean for label, (mean, _) in spread.items()}
    online = acc.get("online DPO")
    notes = []

    def pm(label: str) -> str:
        return f"{100 * spread[label][0]:.1f} ± {100 * spread[label][1]:.1f}"

    for label in ("semi-online DPO (s = 4)", "semi-online DPO (s = 16)", "online DPO", "GRPO"):
        if label in acc and "offline DPO" in acc and acc["offline DPO"] >= acc[label]:
            notes.append(f"offline DPO ({pm('offline DPO')}) is not below {label} ({pm(label)})")
        if label in acc and online is not None and abs(acc[label] - online) > 0.05:
            notes.append(
                f"{label} ({pm(label)}) is {100 * (acc[label] - online):+.1f} points from online DPO "
                f"({pm('online DPO')}; more than 5)"
            )
    return spread, notes


def report(
    runs: dict[str, list[Run]], setup: Setup, curves: dict, target: float, wins: dict[str, tuple[float, float | None]]
) -> tuple[str, list[str]]:
    """paper.md's text (table, ordering, accuracy curves, plots) and the ordering notes."""
    reached = {label: first_reaching(curve, target) for label, curve in curves.items()}
    md = table(runs, setup, reached, target)
    _, notes = ordering(runs)
    verdict = "reproduced." if not notes else "not fully: " + "; ".join(notes) + "."
    md += f"\nOrdering offline < semi-online ≈ online ≈ GRPO (±5 points): {verdict}\n"
    md += "\nAccuracy at each checkpoint (seed 0; step: training seconds → accuracy):\n\n"
    for label, curve in curves.items():
        md += f"- {label}: " + ", ".join(f"{s}: {t:.0f}s → {100 * a:.1f}%" for s, t, a in curve) + "\n"
    labels = [label for label, _, _ in setup.regimes]
    md += f"\n![entropy and length]({plot(runs, labels, 'paper_dynamics', 'entropy and length vs step').name})\n"
    if "online DPO, no reference sync" in runs:
        pair = ["online DPO", "online DPO, no reference sync"]
        title = "online DPO with and without reference sync"
        md += f"\n![reference sync]({plot(runs, pair, 'paper_ref_sync', title).name})\n"
    if wins:
        md += (
            "\nThe RM rows' accuracy is toy math; what they were trained for is judged here: win rate against the "
            f"seed's answers on {setup.problems} held-out toy chat prompts, scored by tiny-RM (a tie counts half):\n\n"
        )
        for label, (win, normalized) in wins.items():
            shown = "–" if normalized is None else f"{normalized:.3f}"
            md += f"- {label}: win rate {100 * win:.1f} %, length-normalised reward {shown}\n"
    return md, notes


def sweep(args: argparse.Namespace) -> str:
    """`--sweep`: bench/sweep.py's grid, narrowed by `--steps/--seeds/--lrs/--regimes` for a reduced run;
    with `--report`, the report again from the last sweep's run records (the same narrowing flags)."""
    from bench.sweep import LRS, REGIMES, Grid, read_records, run_grid
    from bench.sweep_report import write_report

    regimes = [r for r in REGIMES if args.regimes is None or r[0] in args.regimes]
    grid = Grid(regimes=regimes, lrs=tuple(args.lrs or LRS), parallel=args.parallel, curves=args.curves)
    grid.steps, grid.seeds = args.steps or grid.steps, args.seeds or grid.seeds
    return write_report(read_records() if args.report else run_grid(grid, args.resume), grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 12 steps, 3 regimes")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="lr × regime sweep instead (bench/sweep.py, ~1 h)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="--sweep: learning rates")
    parser.add_argument("--regimes", nargs="+", default=None, help="--sweep: regime labels (default: all)")
    parser.add_argument("--parallel", type=int, default=1, help="--sweep: runs at once")
    parser.add_argument("--curves", choices=["heldout", "train"], default="heldout", help="--sweep: curve source")
    parser.add_argument("--report", action="store_true", help="--sweep: re-render from the last sweep's records")
    parser.add_argument("--resume", action="store_true", help="--sweep: run only the cells the records lack")
    parser.add_argument("--rm", action="store_true", help="verifier-only, RM-only and mixed runs (Table 3)")
    args = parser.parse_args()
    if args.sweep:
        print(sweep(args))
        return
    if args.rm:
        rm_main(Setup(args.steps or 80, args.seeds or 1, 200, 4, RM_ROWS, []))
        return
    if args.quick:
        setup = Setup(args.steps or 12, args.seeds or 1, 100, 2, [MAIN[0], MAIN[1], MAIN[3]], [])
    else:
        setup = Setup(args.steps or 40, args.seeds or 3, 200, 4, MAIN, EXTRAS)  # ~18 min: `make bench` ≤ 30
    runs = run_all(setup)
    curves = {label: accuracy_curve(runs[label][0], setup) for label, _, _ in setup.regimes}
    target = curves["online DPO"][-1][2] - 0.02
    RESULTS.mkdir(parents=True, exist_ok=True)
    wins = {label: rm_win_rate(runs[label][0], setup) for label in runs if "RM" in label}
    md, notes = report(runs, setup, curves, target, wins)
    (RESULTS / "paper.md").write_text(md)
    print(md)
    spread, _ = ordering(runs)
    rows = []
    for label, (mean, sem) in spread.items():
        rows += [row(f"{label}: held-out accuracy", mean, None, "ratio")]
        rows += [row(f"{label}: held-out accuracy, s.e. over {len(runs[label])} seed(s)", sem, None, "ratio")]
    rows += [row(f"{label}: tiny-RM win rate vs seed", win, None, "ratio") for label, (win, _) in wins.items()]
    rows.append(row("ordering offline < semi-online ≈ online ≈ GRPO", float(not notes), 1.0, "bool"))
    semi = first_reaching(curves["semi-online DPO (s = 4)"], target)
    online = first_reaching(curves["online DPO"], target)
    if semi is not None and online:
        rows.append(
            row("time to target: semi-online s=4 / online DPO", semi / online, 0.6, "x", higher_is_better=False)
        )
    print_table(rows)
    print(f"recorded in {record('paper', rows)}")


if __name__ == "__main__":
    main()
