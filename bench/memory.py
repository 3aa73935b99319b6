"""Memory benchmark: the trainer's peak memory grows with the micro-batch, not with the batch.

What it measures, on this machine's CPU (fp32, one process, ZeRO-0, SmolLM2-135M, 49k vocabulary): the
peak resident memory of one real update (`cadence.trainer.update.update`: policy forward and backward,
reference forward, AdamW step) above the memory the process holds after a first update (weights, the
reference, AdamW's state and the gradient buffers, which the engine keeps from step to step), for DPO and
GRPO on long completions (32 prompt + 256 completion tokens) at growing batch sizes:
1. micro-batched (`micro_batch_tokens` = one DPO pair / two GRPO rollouts): the peak at the largest batch
   over the peak at the smallest — the ratio printed (goal ≤ 1.25: flat, whatever the batch);
2. the same largest batch in one pass (`micro_batch_tokens` large), the way the trainer ran before, for
   contrast (reported only);
3. the process's whole peak (baseline included) at each size, so that what the baseline holds is in view.

Simplifications: each measurement runs in its own process (peak RSS is per process; Linux's
`/proc/self/clear_refs` resets it after the first update, so model loading does not count); synthetic
token ids; the log-softmax chunks are always on (they are not a setting).

Run: `.venv/bin/python bench/memory.py` (about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, record, row

PROMPT, COMPLETION, VOCAB = 32, 256, 49152
ONE_PASS = 10**6


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status (this benchmark needs Linux)")


def measure(model_dir: str, algorithm: str, prompts: int, budget: int) -> None:
    """Child process: one update of `prompts` groups (two samples each, one right, one wrong); prints MiB."""
    import torch
    from trainer import make_groups

    from cadence.config import RunConfig
    from cadence.trainer.engine import TrainEngine
    from cadence.trainer.update import update

    torch.set_num_threads(2)
    algo = {"type": "dpo"} if algorithm == "dpo" else {"type": "grpo", "aggregation": "seq_mean_token_sum"}
    config = RunConfig.model_validate({"algorithm": algo, "sampling": {"n": 2}, "micro_batch_tokens": budget})
    engine = TrainEngine(model_dir, config)
    groups = make_groups(prompts, PROMPT, COMPLETION, VOCAB)
    update(engine, groups[:1], step=0)  # allocate AdamW's state and DeepSpeed's buffers before measuring
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    update(engine, groups, step=1)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "process_mib": _rss_kib("VmHWM") / 1024}))


def run(model_dir: Path, algorithm: str, prompts: int, budget: int) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", str(model_dir), algorithm, str(prompts), str(budget)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "ALGO", "PROMPTS", "BUDGET"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3], help="prompts per step (2 samples each)")
    args = parser.parse_args()
    if args.child:
        model, algorithm, prompts, budget = args.child
        measure(model, algorithm, int(prompts), int(budget))
        return
    from cadence.models.smollm2 import build_smollm2

    model_dir = build_smollm2()
    rows = []
    length = PROMPT + COMPLETION
    for algorithm, budget in (("dpo", 2 * length), ("grpo", 2 * length)):
        runs = {n: run(model_dir, algorithm, n, budget) for n in args.sizes}
        peaks = {n: r["peak_mib"] for n, r in runs.items()}
        print(algorithm, "micro-batched peaks (MiB):", peaks, flush=True)
        small, large = args.sizes[0], args.sizes[-1]
        runs["one pass"] = run(model_dir, algorithm, large, ONE_PASS)
        one_pass = runs["one pass"]["peak_mib"]
        for n, peak in peaks.items():
            rows.append(row(f"{algorithm} {n} prompts × 2, micro-batched: peak", peak, None, "MiB"))
        rows.append(row(f"{algorithm} {large} prompts × 2, one pass: peak", one_pass, None, "MiB"))
        for n, measured in runs.items():
            label = f"{large} prompts × 2, one pass" if n == "one pass" else f"{n} prompts × 2, micro-batched"
            rows.append(row(f"{algorithm} {label}: process peak", measured["process_mib"], None, "MiB"))
        ratio = peaks[large] / peaks[small]
        rows.append(row(f"{algorithm} peak {large}/{small} prompts, micro-batched", ratio, 1.25, "×", False))
        rows.append(
            row(f"{algorithm} peak one pass / micro-batched at {large} prompts", one_pass / peaks[large], None, "×")
        )
    print_table(rows)
    print(f"recorded in {record('memory', rows)}")


if __name__ == "__main__":
    main()
