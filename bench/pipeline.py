"""Pipeline efficiency: Cadence's overlapped pipeline against the same steps run one stage after another.

(a) sequential: one process (1 torch thread, like each service) generates a step's 32 prompts × 8 samples
    with the HF engine, scores them with `MathVerifier`, trains one update with `TrainEngine` and the
    trainer's own `update`/`execute`, then copies the weights into the engine (sync) — and repeats.
(b) `cadence run` (separate processes on Redis streams and the broker) with s = 1, 4, 16, and s = 1 with
    async_lag = 1; per-step generation/scoring times come from the rollouts (`time_generation`,
    `time_scoring` in metrics.jsonl), training is `time_compute`, waiting `time_wait`, sync `time_publish`;
    the step time is wall clock, from one step's batch being complete to the next one's (Redis stream ids).

Overlap efficiency = max(generation, training) per step ÷ actual step time (1.0: the slower stage alone
sets the pace). Beside the plain speed-up (sequential step ÷ the variant's), s = 1 gets the speed-up *at equal
stage times*: sequential step ÷ (sequential step + what the s = 1 step takes beyond its own generation,
scoring and training). At the toy's lr 5e-4 the policy's answers change length from step to step, so two runs
of 16 steps differ in generation time alone: four `--quick` runs on 2026-12-02 gave plain ratios from 0.60×
to 1.00× (s = 1 generation 0.23-0.36 s a step, the sequential loop's 0.23-0.26 s); the cost beyond the stages
is what the services add. The first steps (start-up) are left out of every mean. With
async_lag = 0 the rule itself caps the overlap below 1 (the pipeline drains at every sync); `rule bound` is
that cap for the measured stage times.

Run: `.venv/bin/python -m bench.pipeline [--quick]` (~5 min; --quick ~1.5 min). Writes bench/results/pipeline.json.
Measured (`--quick`, 2-core sandbox, 2026-12-02 04:51-04:53, load 1.3-1.6, the code before and after this
session's s = 1 cuts back to back): at equal stage times 0.90× → 0.93× (beyond the stages 48 → 39 ms a step);
plain ratio 0.85× → 1.00× (its sequential run drew longer answers); s = 4 1.10× → 1.24×.
Where an online step's time goes beyond the stages, hop by hop: `bench.trace` on one run.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import print_table, record, row
from bench._runs import ROOT, Run, cadence_run, load_average, mean
from cadence.trainer.retention import archived

CONFIG = "toy-semi-online-dpo"
PHASES = ("generation", "scoring", "training", "waiting", "sync")


def sequential(steps: int, seed: int = 0) -> list[dict[str, float]]:
    """The same steps as online DPO, each stage after the other, in this process; per-step phase seconds."""
    import torch

    from cadence.config import load_run_config
    from cadence.inference.engine import SamplingParams
    from cadence.inference.factory import create_engine
    from cadence.models import resolve_model
    from cadence.reward.verifier import MathVerifier
    from cadence.tasks import load_problems
    from cadence.trainer.engine import TrainEngine
    from cadence.trainer.update import Group, StepPlan, execute

    torch.set_num_threads(1)
    config = load_run_config(ROOT / "configs" / f"{CONFIG}.yaml", [f"steps={steps}", "sync_every=1", f"seed={seed}"])
    model_dir = resolve_model(config.model.path)
    problems = [p for task in config.tasks for p in load_problems(task, seed=config.seed)]
    random.Random(seed).shuffle(problems)
    sp = config.sampling
    params = SamplingParams(
        n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens
    )
    generator = create_engine("hf", model_dir)
    trainer = TrainEngine(model_dir, config)
    verifier = MathVerifier(processes=1)
    verifier.wait_ready()
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for step in range(steps):
            batch = [problems[(step * config.batch_prompts + i) % len(problems)] for i in range(config.batch_prompts)]
            t0 = time.perf_counter()
            generation = generator.generate([p.text for p in batch], params)
            t1 = time.perf_counter()
            completions = generation.completions
            pairs = [(s.text, p.reference) for p, c in zip(batch, completions, strict=True) for s in c.samples]
            rewards = [v.reward for v in verifier.verify_many(pairs)]
            t2 = time.perf_counter()
            groups = [
                Group(p.prompt_id, "math", step, c.prompt_token_ids, [s.token_ids for s in c.samples],
                      rewards[i * sp.n : (i + 1) * sp.n], [s.logprobs for s in c.samples])
                for i, (p, c) in enumerate(zip(batch, generation.completions, strict=True))
            ]  # fmt: skip
            execute(trainer, None, StepPlan(step, groups), Path(run_dir))
            t3 = time.perf_counter()
            _, state = execute(trainer, None, StepPlan(step, sync_reference=True, gather=True), Path(run_dir))
            generator.load_weights(state.items(), step + 1)
            t4 = time.perf_counter()
            rows.append({"generation": t1 - t0, "scoring": t2 - t1, "training": t3 - t2, "waiting": 0.0,
                         "sync": t4 - t3, "step_time": t4 - t0})  # fmt: skip
    verifier.close()
    generator.close()
    return rows


def pipelined(name: str, steps: int, sync_every: int, async_lag: int) -> list[dict[str, float]]:
    """A `cadence run` of the same steps; its per-step phase seconds from metrics.jsonl, and its step time
    from the wall clock (`completed`): the trainer's own clock does not see what it does between steps."""
    overrides = [f"steps={steps}", f"sync_every={sync_every}", f"async_lag={async_lag}", "eval.max_problems=1"]
    run: Run = cadence_run(name, CONFIG, overrides)
    done = completed(run.folder)
    return [
        {"generation": m.get("time_generation", 0.0), "scoring": m.get("time_scoring", 0.0),
         "training": m["time_compute"], "waiting": m["time_wait"], "sync": m["time_publish"],
         "step_time": done[m["step"]] - done[m["step"] - 1]}
        for m in run.metrics if m["step"] - 1 in done and m["step"] in done
    ]  # fmt: skip


def completed(folder: Path) -> dict[int, float]:
    """When each step's batch was complete: the Redis id (a millisecond timestamp) of its last scored entry,
    read from the run's stream archive and ledger. The differences are the steps' wall-clock times."""
    scored: dict[str, float] = {}
    for entry_id, prompt_id in archived(folder, "scored").items():
        scored[prompt_id] = max(scored.get(prompt_id, 0.0), int(entry_id.split("-")[0]) / 1000)
    ledger = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines() if line]
    return {row["step"]: max(scored[p] for p in row["prompt_ids"]) for row in ledger if row["prompt_ids"]}


def summarize(rows: list[dict[str, float]], warmup: int, sync_every: int = 1, async_lag: int = 0) -> dict[str, float]:
    """Mean phase seconds per step after `warmup` steps, the overlap efficiency, and its bound under the rule."""
    steady = rows[warmup:] or rows
    out = {key: mean([r[key] for r in steady]) for key in (*PHASES, "step_time")}
    out["overlap"] = max(out["generation"], out["training"]) / out["step_time"]
    out["beyond"] = out["step_time"] - out["generation"] - out["scoring"] - out["training"]
    out["bound"] = rule_bound(out, sync_every, async_lag)
    return out


def rule_bound(phases: dict[str, float], sync_every: int, async_lag: int) -> float:
    """The best overlap efficiency the cadence rule allows with these stage times.

    With async_lag = 0, the first batch after a sync must be generated by the new weights, so every s steps
    the pipeline drains: the last batch is still scored and trained (and the weights published) while the
    generator waits. A window of s steps then lasts s·slowest + (the other stages once) + sync; with a lag
    the generator never waits for the trainer, so nothing bounds it below 1.
    """
    if async_lag > 0:
        return 1.0
    stages = [phases["generation"], phases["scoring"], phases["training"]]
    slowest = max(stages)
    window = sync_every * slowest + (sum(stages) - slowest) + phases["sync"]
    return sync_every * slowest / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 steps, s = 1 and 4 only")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (16 if args.quick else 48)
    warmup = max(3, steps // 6)
    variants = [("s1", 1, 0), ("s4", 4, 0)] + ([] if args.quick else [("s16", 16, 0), ("s1-lag1", 1, 1)])
    results: dict[str, dict[str, float]] = {"sequential": summarize(sequential(steps), warmup)}
    for name, s, lag in variants:
        results[name] = summarize(pipelined(f"pipeline-{name}", steps, s, lag), warmup, s, lag)
    print(f"load average (1/5/15 min) after the runs: {load_average()}")
    print_table_of_phases(results)
    record("pipeline", rows_of(results))


def rows_of(results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    base = results["sequential"]["step_time"]
    rows = [row("sequential: step time", base, None, "s", higher_is_better=False)]
    for name, r in results.items():
        if name == "sequential":
            continue
        goal = 0.9 if name in ("s4", "s16") else None  # the goal is set for s >= 4
        rows.append(row(f"{name}: step time", r["step_time"], None, "s", higher_is_better=False))
        rows.append(row(f"{name}: overlap efficiency", r["overlap"], goal, "ratio"))
        rows.append(row(f"{name}: best overlap the cadence rule allows", r["bound"], None, "ratio"))
        rows.append(row(f"{name}: speed-up over sequential", base / r["step_time"], 1.0 if goal else None, "x"))
        rows.append(row(f"{name}: weight sync / step time", r["sync"] / r["step_time"], None, "ratio"))
        if name.startswith("s1"):  # at s > 1 the stages overlap, so the step is shorter than their sum
            rows.append(row(f"{name}: step beyond its generation + scoring + training", r["beyond"], None, "s", False))
        if name == "s1":
            equal = base / (base + r["beyond"])
            rows.append(row("s1: speed-up at equal stage times", equal, 0.95, "x"))
    return rows


def print_table_of_phases(results: dict[str, dict[str, float]]) -> None:
    header = ["variant", *PHASES, "step", "overlap", "rule bound", "speed-up"]
    print("  ".join(f"{h:>10}" for h in header))
    base = results["sequential"]["step_time"]
    for name, r in results.items():
        cells = [f"{r[k]:.3f}" for k in (*PHASES, "step_time")] + [
            f"{r['overlap']:.2f}",
            f"{r['bound']:.2f}",
            f"{base / r['step_time']:.2f}",
        ]
        print("  ".join(f"{c:>10}" for c in [name, *cells]))
    print_table(rows_of(results))


if __name__ == "__main__":
    main()
