"""The `tiny` seed model, built locally (no hub); `rm.py` builds `tiny-rm`, `smollm2.py` fetches `smollm2`, and
`registry.resolve_model` picks the builder by name (`cadence seed-model tiny | tiny-rm | smollm2`).

`build_tiny` follows TOY.md: a random-init tiny Llama, then SFT on the toy training split (batch 64,
AdamW 3e-3, betas (0.9, 0.98), 50-step linear warm-up then constant, clip 1.0, loss on completion
tokens only). Accuracy sits at 5-10 % and then jumps to ~85 % within 100-150 steps at a step that
depends on the seed, so the build stops by accuracy, not time: greedy accuracy on 200 held-out prompts
every 25 steps, stop at the first check >= 20 % (confirmed on all 500 held-out prompts). A check
above 60 % overshot: the previous checkpoint (model, optimizer and data order) is restored and the
interval shrinks 25 → 5 → 1, which keeps the "previous checkpoint" while still reaching 20 %.
Deterministic given the seed (two threads, seeded init and data order).

Run: `cadence seed-model tiny [--seed 0] [--force]` (prints the model directory last).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.models.cache import MARKER, cached_build
from cadence.models.toytrain import greedy_accuracy, progress, sft_tensors, torch_threads, toy_scores
from cadence.tasks.problem import Problem
from cadence.tasks.toy import load_toy, toy_target

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

BATCH = 64
LR = 3e-3
BETAS = (0.9, 0.98)
WARMUP = 50
CLIP = 1.0
CHECK_PROMPTS = 200
STOP_AT, OVERSHOOT, CEILING = 0.20, 0.60, 0.80
MAX_STEPS = 4000
THREADS = 2
Snapshot = tuple[Any, Any, Any, Any, int]
"""Model, optimizer and schedule state, data-order RNG state, step."""


def build_tiny(seed: int = 0, force: bool = False) -> Path:
    """The trained tiny seed model, cached under `models_dir()/tiny-seed{seed}`."""
    return cached_build(f"tiny-seed{seed}", lambda out: _build_tiny(out, seed), force)


def _build_tiny(out_dir: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadence.models.tiny import save_untrained_tiny

    started = time.monotonic()
    with torch_threads(THREADS):
        save_untrained_tiny(out_dir, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        test = load_toy("test", seed=seed)
        step, check = _sft(model, tokenizer, seed, test)
        scores = toy_scores(model, tokenizer, test, k=8, seed=seed)
        model.save_pretrained(out_dir, safe_serialization=True)
    record = {
        "kind": "tiny",
        "seed": seed,
        "steps": step,
        "last_check_accuracy": check,
        "heldout_problems": len(test),
        "greedy_accuracy": scores.greedy,
        "sampled_accuracy": scores.sampled,
        f"pass_at_{scores.k}": scores.pass_at_k,
        "build_seconds": round(time.monotonic() - started, 1),
        "recipe": {"batch": BATCH, "lr": LR, "betas": BETAS, "warmup": WARMUP, "clip": CLIP},
    }
    (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _sft(model: PreTrainedModel, tokenizer: Any, seed: int, test: list[Problem]) -> tuple[int, float]:
    """Train until the stop rule holds; returns (steps taken, accuracy of the deciding check)."""
    import torch

    train = load_toy("train", seed=seed)
    inputs, labels = sft_tensors(tokenizer, [p.text for p in train], [toy_target(p.reference) for p in train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    order = torch.Generator().manual_seed(seed)
    interval, step, snapshot = 25, 0, _snapshot(model, optimizer, schedule, order, 0)
    with progress() as bar:
        task = bar.add_task(f"SFT tiny (seed {seed})", total=MAX_STEPS, status="")
        while step < MAX_STEPS:
            sft_steps(model, optimizer, schedule, order, inputs, labels, interval)
            step += interval
            model.eval()
            accuracy = greedy_accuracy(model, tokenizer, test[:CHECK_PROMPTS])
            bar.update(task, completed=step, status=f"held-out greedy {accuracy:.0%}")
            if accuracy > OVERSHOOT and interval > 1:
                bar.console.log(f"step {step}: {accuracy:.0%} overshoots; back to step {snapshot[-1]}")
                step, interval = _restore(model, optimizer, schedule, order, snapshot), interval // 5
            elif accuracy >= STOP_AT and STOP_AT <= greedy_accuracy(model, tokenizer, test) <= CEILING:
                bar.console.log(f"step {step}: held-out greedy {accuracy:.0%}, stopping")
                return step, accuracy
            else:
                snapshot = _snapshot(model, optimizer, schedule, order, step)
            model.train()
    raise RuntimeError(f"tiny seed {seed} did not reach {STOP_AT:.0%} in {MAX_STEPS} steps; try another --seed")


def sft_steps(
    model: Any,
    optimizer: Any,
    schedule: Any,
    order: torch.Generator,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    count: int,
) -> None:
    """`count` SFT steps on random rows (drawn from `order`, so a restored generator replays them)."""
    import torch

    model.train()
    for _ in range(count):
        rows = torch.randint(0, inputs.shape[0], (BATCH,), generator=order)
        batch, target = inputs[rows], labels[rows]
        width = int((batch != model.config.pad_token_id).sum(dim=1).max())
        batch, target = batch[:, :width], target[:, :width]
        logits = model(input_ids=batch, attention_mask=(batch != model.config.pad_token_id).long()).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()


def _snapshot(model: Any, optimizer: Any, schedule: Any, order: torch.Generator, step: int) -> Snapshot:
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(schedule.state_dict()),
        order.get_state(),
        step,
    )


def _restore(model: Any, optimizer: Any, schedule: Any, order: torch.Generator, snapshot: Snapshot) -> int:
    model_state, optimizer_state, schedule_state, order_state, step = snapshot
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    schedule.load_state_dict(schedule_state)
    order.set_state(order_state)
    return step
