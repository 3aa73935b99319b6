"""Redis memory over a long toy run: the streams grow without bound unless finished entries are trimmed.

A real local run (`cadence run`'s own processes: private Redis with AOF, broker, reward, one hf inference
worker, trainer) of configs/toy-semi-online-dpo.yaml, sampled every `--every` steps: Redis `INFO memory`
used_memory and the length of each of the run's three streams. Two runs:
- `untrimmed`: `checkpoint_every: 0`, the old default — no checkpoint before the end, so the trainer never
  trims (nothing is acknowledged before a checkpoint): the streams keep every entry they were given, as
  every run did before trimming existed;
- `trimmed`: the default `checkpoint_every` (steps / 20, at most 50): every checkpoint trims what every stage
  acknowledged.

Each run stops at `--steps` or after `--seconds`, whichever comes first, and the rows say which; growth per
step is fitted on the samples, so a run cut short is extrapolated (reported as such), not claimed.
`--batch-prompts` / `--samples` shrink a step (the config's 32 prompts × 8 samples by default) so that a
2,000-step run fits on a small machine: every stream gets one entry per prompt a step, so the rows also give
the growth per entry, which scales the figure back to any batch.

    python -m bench.redis_memory [--steps 2000] [--seconds 900] [--every 50] [--batch-prompts 32] [--samples 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench._common import print_table, record, row
from cadence import streams
from cadence.app.launcher import LocalRun, make_plan
from cadence.config import dump_run_config, load_run_config
from cadence.models import resolve_model

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy-semi-online-dpo.yaml"


def sample(client: redis.Redis, run_id: str, step: int) -> dict[str, Any]:
    lengths = {kind: int(client.xlen(streams.stream_key(run_id, kind))) for kind in streams.GROUPS}
    return {"step": step, "used_memory": int(client.info("memory")["used_memory"]), **lengths}


def one_run(
    label: str, steps: int, seconds: float, every: int, checkpoint_every: int | None, shape: dict[str, int]
) -> list[dict]:
    """Run the toy config, sampling Redis every `every` steps; returns the samples.

    `shape` sets the config's `batch_prompts` and `sampling.n` (`{"batch_prompts": 8, "n": 4}`)."""
    config = load_run_config(CONFIG)
    dump = config.model_dump()
    update: dict[str, Any] = {"steps": steps, "run_id": f"redis-{label}", "checkpoint_every": checkpoint_every}
    update["batch_prompts"] = shape["batch_prompts"]
    update["sampling"] = dump["sampling"] | {"n": shape["n"]}
    config = config.model_validate(dump | update)
    root = Path(tempfile.mkdtemp(prefix=f"redis-{label}-"))
    plan = make_plan(config, root, engine="hf")
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text(dump_run_config(plan.config))
    run = LocalRun(plan, resolve_model(config.model.path))
    samples: list[dict] = []
    try:
        run.start()
        client = redis.Redis.from_url(plan.redis_url)
        samples.append(sample(client, plan.run_id, 0))
        started = time.monotonic()
        metrics = plan.run_dir / "metrics.jsonl"
        while time.monotonic() - started < seconds:
            run.raise_if_failed()
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done >= samples[-1]["step"] + every or run.trainer().returncode == 0:
                samples.append(sample(client, plan.run_id, done) | {"seconds": time.monotonic() - started})
                print(label, samples[-1], flush=True)
            if run.trainer().returncode == 0:
                break
            time.sleep(0.2)
        samples[-1]["seconds"] = time.monotonic() - started
    finally:
        run.stop()
        shutil.rmtree(root, ignore_errors=True)
    return samples


def per_step(samples: list[dict], key: str) -> float:
    """Least-squares slope of `key` against the step (skipping the empty start)."""
    points = [(s["step"], s[key]) for s in samples if s["step"] > 0]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def variant_rows(label: str, samples: list[dict], steps: int, batch_prompts: int) -> list[dict]:
    """One variant's rows. A run that ends takes a final checkpoint, which trims everything acknowledged (in
    both variants), so the figures are read on the samples taken while it ran; the end gets its own row."""
    during = [s for s in samples if s["step"] < steps]
    last, end = during[-1], samples[-1]
    growth = per_step(during, "used_memory")
    rows = [row(f"{label}: steps reached (of {steps}) in {end['seconds']:.0f} s", end["step"], None, "steps")]
    pace = end["seconds"] / max(end["step"], 1)
    rows.append(row(f"{label}: seconds a step (the trainer's start included)", pace, None, "s"))
    rows.append(row(f"{label}: Redis used_memory at step {last['step']}", last["used_memory"] / 2**20, None, "MiB"))
    rows.append(row(f"{label}: peak used_memory", max(s["used_memory"] for s in samples) / 2**20, None, "MiB"))
    rows.append(row(f"{label}: used_memory growth", growth / 1024, None, "KiB/step"))
    rows.append(row(f"{label}: used_memory growth per prompt", growth / batch_prompts, None, "B/prompt"))
    projected = (samples[0]["used_memory"] + growth * steps) / 2**20
    rows.append(row(f"{label}: used_memory at step {steps} (fitted)", projected, None, "MiB"))
    for kind in streams.GROUPS:
        rows.append(row(f"{label}: {kind} stream length at step {last['step']}", last[kind], None, "entries"))
        rows.append(row(f"{label}: {kind} stream longest", max(s[kind] for s in samples), None, "entries"))
    if end["step"] >= steps:
        rows.append(row(f"{label}: used_memory after the run's end", end["used_memory"] / 2**20, None, "MiB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-prompts", type=int, default=None, help="prompts a step (default: the config's)")
    parser.add_argument("--samples", type=int, default=None, help="samples a prompt (default: the config's)")
    args = parser.parse_args()
    config = load_run_config(CONFIG)
    shape = {"batch_prompts": args.batch_prompts or config.batch_prompts, "n": args.samples or config.sampling.n}
    rows = [row("prompts a step", shape["batch_prompts"], None, "prompts")]
    rows.append(row("samples a prompt", shape["n"], None, "samples"))
    for label, checkpoint_every in (("untrimmed", 0), ("trimmed", None)):
        samples = one_run(label, args.steps, args.seconds, args.every, checkpoint_every, shape)
        rows += variant_rows(label, samples, args.steps, shape["batch_prompts"])
    print_table(rows)
    print(f"recorded in {record('redis_memory', rows)}")


if __name__ == "__main__":
    main()
