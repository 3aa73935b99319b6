"""The length collapse on the toy, and its remedies, side by side (issue 18).

Lenient verification reads the last complete box, so `\\boxed{167}6}` counts as 167. Under DPO the chosen
side is the right answers: once some right answers run on past the box to the 14-token cap while wrong ones
stop, EOS shows up mostly on the rejected side and every step pushes its log-probability down; the policy
stops terminating. The trainer logs the signal per step (`eos_rate_correct` / `eos_rate_incorrect`: math
samples ending with EOS, right and wrong apart; `eos_logp_*`: the generating policy's log-prob of that EOS).

Variants (each a real `cadence run` of the embedded default, configs/toy-semi-online-dpo.yaml, s = 4):
lenient (the old default), format-strict verification (`strict_format`: text after the last box scores 0),
length-normalised DPO, and NLL on chosen. Seeds run interleaved (seed-major), so machine load hits every
variant alike. Held-out accuracy is lenient for all (the last box), next to the share of held-out answers
that stop after their box.

`--mechanism`: the collapse's drive without the pipeline, in seconds: DPO steps (the trainer's `dpo_loss`,
β 0.1, AdamW 5e-4) on the tiny seed with pairs built by hand, a quarter of them with a right answer that
runs on (`\\boxed{N}7}`, no EOS) — chosen when scoring is lenient, rejected against the same answer stopping
when it is strict — and log p(EOS | prompt, right box) on 200 held-out problems every 5 steps.

Run: `.venv/bin/python -m bench.length [--steps N] [--seeds K] [--parallel P] | --mechanism`. Budget (defaults,
4 variants × 3 seeds × 800 steps): about 45 min on 2 quiet cores (0.2 s a step), hours on busy ones.
Writes bench/results/length.md and length.png (or length_mechanism.md).
"""

from __future__ import annotations

import argparse
import json

from bench._common import RESULTS
from bench._runs import Run, load_average, mean_sem, run_many

VARIANTS = [
    ("lenient", ["strict_format=false"]),
    ("strict format", ["strict_format=true"]),
    ("length-normalised DPO", ["algorithm.length_normalize=true"]),
    ("NLL on chosen (0.2)", ["algorithm.nll_coef=0.2"]),
]
CONFIG = "toy-semi-online-dpo"


def stops_after_box(run: Run) -> float:
    """Share of the run's final held-out answers with nothing but closing marks after their last box."""
    from cadence.reward.verifier import runs_past_last_box

    answers = [
        a for line in (run.folder / "eval_after.jsonl").read_text().splitlines() for a in json.loads(line)["answers"]
    ]
    return sum(not runs_past_last_box(a) for a in answers) / max(1, len(answers))


def tail(run: Run, key: str, last: int = 20) -> float:
    values = run.series(key)[-last:]
    return sum(values) / len(values) if values else float("nan")


def run_all(steps: int, seeds: int, problems: int, variants: list, parallel: int) -> dict[str, list[Run]]:
    jobs, labels = [], []
    for seed in range(seeds):
        for label, extra in variants:
            overrides = [f"steps={steps}", f"seed={seed}", "checkpoint_every=0", f"eval.max_problems={problems}"]
            slug = "len-" + "".join(c if c.isalnum() else "-" for c in label.lower())[:20]
            jobs.append((slug, CONFIG, overrides + extra))
            labels.append(label)
    runs: dict[str, list[Run]] = {}
    for label, run in zip(labels, run_many(jobs, parallel), strict=True):
        runs.setdefault(label, []).append(run)
    return runs


def plot(runs: dict[str, list[Run]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("length_mean", "mean sample length (tokens)"),
        ("eos_rate_correct", "right samples ending with EOS"),
        ("eos_rate_incorrect", "wrong samples ending with EOS"),
        ("accuracy", "train accuracy (samples)"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for label, group in runs.items():
        for axis, (key, title) in zip(axes, keys, strict=True):
            for index, run in enumerate(group):
                steps = [m["step"] for m in run.metrics if m.get(key) is not None]
                axis.plot(steps, run.series(key), color=f"C{list(runs).index(label)}", alpha=0.7,
                          label=label if index == 0 else None)  # fmt: skip
            axis.set(xlabel="step", title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "length.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def report(runs: dict[str, list[Run]], steps: int) -> str:
    seeds = len(next(iter(runs.values())))
    lines = [
        f"# The length collapse and its remedies ({CONFIG}, s = 4, {steps} steps, {seeds} seed(s), mean ± s.e.)",
        "",
        f"2-core CPU sandbox, shared with other jobs (load average at the end {load_average()}); variants ran "
        "interleaved per seed. Held-out: greedy, lenient verification (last box); 'stop after box': held-out "
        "answers with nothing after their last box. Train columns: means over the last 20 steps.",
        "",
        "| variant | held-out acc. (%) | stop after box (%) | train length | right ending EOS | wrong ending EOS "
        "| EOS log-prob right / wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, group in runs.items():
        acc = mean_sem([r.after["accuracy"] for r in group])
        stop = mean_sem([stops_after_box(r) for r in group])
        cells = [
            mean_sem([tail(r, key) for r in group]) for key in ("length_mean", "eos_rate_correct", "eos_rate_incorrect")
        ]
        logps = [mean_sem([tail(r, key) for r in group])[0] for key in ("eos_logp_correct", "eos_logp_incorrect")]
        lines.append(
            f"| {label} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | {100 * stop[0]:.1f} ± {100 * stop[1]:.1f} "
            + "".join(f"| {m:.2f} ± {s:.2f} " for m, s in cells)
            + f"| {logps[0]:.3f} / {logps[1]:.3f} |"
        )
    seed_acc = mean_sem([r.before["accuracy"] for r in next(iter(runs.values()))])
    lines += ["", f"Seed model: {100 * seed_acc[0]:.1f} % held-out.", "", f"![length and EOS]({plot(runs)})", ""]
    return "\n".join(lines)


MECHANISM = [
    ("lenient", "lenient", {}),
    ("strict format", "strict", {}),
    ("lenient, length-normalised DPO", "lenient", {"length_normalize": True}),
    ("lenient, NLL on chosen (0.2)", "lenient", {"nll_coef": 0.2}),
]


def mechanism(steps: int = 30, share: float = 0.25, pairs: int = 64) -> dict[str, list[float]]:
    """log p(EOS right after a right box), held-out mean, every 5 DPO steps, for each MECHANISM variant."""
    import copy
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadence.models.seed import build_tiny
    from cadence.tasks.toy import load_toy, toy_target
    from cadence.trainer.losses import dpo_loss

    base = build_tiny(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos, train, test = tokenizer.eos_token_id, load_toy("train"), load_toy("test")[:200]

    def answer(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def logps(model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        rows = [p + c for p, c in zip(prompts, completions, strict=True)]
        ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        token_logps = torch.log_softmax(model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id).logits, -1)
        return torch.stack([
            token_logps[i, len(p) - 1 : len(p) - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).sum()
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ])  # fmt: skip

    def eos_after_box(model) -> float:
        prompts = [tokenizer(p.text)["input_ids"] for p in test]
        boxes = [answer(toy_target(p.reference)) for p in test]
        with torch.no_grad():
            return (logps(model, prompts, [[*b, eos] for b in boxes]) - logps(model, prompts, boxes)).mean().item()

    def batch(rng: random.Random, scoring: str) -> tuple[list, list, list]:
        prompts, chosen, rejected = [], [], []
        for problem in rng.sample(train, pairs):
            right = answer(toy_target(problem.reference))
            runs_on = right + answer(f"{rng.randint(0, 9)}}}")
            wrong = [*answer(toy_target(int(problem.reference) + rng.choice([-11, -10, -1, 1, 10, 11]))), eos]
            if rng.random() >= share:
                pair = ([*right, eos], wrong)
            else:
                pair = ([*right, eos], runs_on) if scoring == "strict" else (runs_on, wrong)
            prompts.append(tokenizer(problem.text)["input_ids"])
            chosen.append(pair[0])
            rejected.append(pair[1])
        return prompts, chosen, rejected

    traces = {}
    for label, scoring, options in MECHANISM:
        torch.manual_seed(0)
        rng = random.Random(0)
        policy = AutoModelForCausalLM.from_pretrained(base)
        reference = copy.deepcopy(policy).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-4, eps=1e-4, weight_decay=0.0)
        trace = [eos_after_box(policy.eval())]
        for step in range(steps):
            prompts, chosen, rejected = batch(rng, scoring)
            with torch.no_grad():
                ref_chosen, ref_rejected = logps(reference, prompts, chosen), logps(reference, prompts, rejected)
            policy.train()
            out = dpo_loss(
                logps(policy, prompts, chosen), logps(policy, prompts, rejected), ref_chosen, ref_rejected, 0.1,
                chosen_lengths=torch.tensor([float(len(c)) for c in chosen]),
                rejected_lengths=torch.tensor([float(len(r)) for r in rejected]), **options,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            if (step + 1) % 5 == 0:
                trace.append(eos_after_box(policy.eval()))
        traces[label] = trace
        print(label, " ".join(f"{value:.3f}" for value in trace), flush=True)
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--variants", nargs="+", default=None, help="variant labels (default: all)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (they slow each other alike)")
    parser.add_argument("--mechanism", action="store_true", help="hand-built DPO pairs on the seed instead")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.mechanism:
        traces = mechanism()
        rows = [f"| {label} | " + " | ".join(f"{v:.3f}" for v in trace) + " |" for label, trace in traces.items()]
        header = "| scoring | " + " | ".join(f"step {5 * i}" for i in range(len(next(iter(traces.values()))))) + " |"
        md = (
            "log p(EOS | prompt, right box), held-out mean\n\n"
            + header
            + "\n|---|"
            + "---|" * (len(rows[0].split("|")) - 3)
        )
        (RESULTS / "length_mechanism.md").write_text(md + "\n" + "\n".join(rows) + "\n")
        print(md + "\n" + "\n".join(rows))
        return
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    runs = run_all(args.steps, args.seeds, args.problems, variants, args.parallel)
    md = report(runs, args.steps)
    (RESULTS / "length.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
