"""`cadence seed-model tiny-rm`: a tiny reward model for the toy domain, so the RM path runs end to end.

A `LlamaForSequenceClassification` (one score) on the toy tokenizer, trained with the Bradley-Terry
loss on synthetic preference pairs: for a toy problem, the concise correct answer ` \\boxed{N}` is
preferred to (a) a wrong boxed number (near misses such as carry errors and random numbers), (b) no
boxed answer, and (c) a rambling answer that ends with the right box. Telling (a) apart means checking
the sum, so the backbone starts from the tiny SFT seed (which has learned some addition) rather than
from random weights. Inputs are rendered with the tokenizer's chat template, exactly as the reward
service renders (prompt, response). Held-out pairs come from the toy test split.

Run: `cadence seed-model tiny-rm [--seed 0] [--force]` (prints the model directory last).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.models.cache import MARKER, cached_build
from cadence.models.seed import build_tiny
from cadence.models.toytrain import progress, torch_threads
from cadence.tasks.problem import Problem
from cadence.tasks.toy import load_toy, toy_target

if TYPE_CHECKING:
    import torch

BATCH = 32
LR = 1e-3
MAX_STEPS = 100
CHECK_EVERY = 25
TARGET = 0.90
NEGATIVES = ("wrong", "unboxed", "rambling")
TRAIN_MIX = (0.6, 0.2, 0.2)
"""Share of each negative kind in training batches: the format negatives are learnt in a few steps,
the wrong sums are what takes practice."""
Pair = tuple[Problem, str, str, str]
"""(problem, chosen response, rejected response, negative kind)."""
_FILLER = ("it", "is", "what", "that", "this", "the", "so", "as", "a", "bad", "idea", "hide", "to", "do")


def build_tiny_rm(seed: int = 0, force: bool = False) -> Path:
    """The tiny toy reward model, cached under `models_dir()/tiny-rm-seed{seed}`."""
    return cached_build(f"tiny-rm-seed{seed}", lambda out: _build(out, seed), force)


def rejected_answer(problem: Problem, kind: str, rng: random.Random) -> str:
    """A response worse than ` \\boxed{answer}`: a wrong number, no box, or rambling."""
    answer = int(problem.reference or 0)
    if kind == "wrong":
        delta = rng.choice([1, 2, 9, 10, 11, 100, rng.randint(1, 198)]) * rng.choice([-1, 1])
        wrong = answer + delta if answer + delta >= 0 else answer + abs(delta)
        return toy_target(wrong)
    if kind == "unboxed":
        return rng.choice([f" {answer}", f" it is {answer}", f" \\boxed{{{answer}", f" {answer}."])
    filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(2, 4)))
    return f" {filler}, so{toy_target(answer)}" if rng.random() < 0.5 else f"{toy_target(answer)} {filler}"


def preference_pairs(
    problems: list[Problem], rng: random.Random, mix: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> list[Pair]:
    """One (problem, chosen, rejected, negative kind) per problem, kinds drawn with weights `mix`."""
    pairs = []
    for problem in problems:
        kind = rng.choices(NEGATIVES, weights=mix)[0]
        pairs.append((problem, toy_target(problem.reference or ""), rejected_answer(problem, kind, rng), kind))
    return pairs


def rm_inputs(tokenizer: Any, problems: list[Problem], responses: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs: the chat template of (prompt, response), as the reward service renders it."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.text}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in zip(problems, responses, strict=True)
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _scores(model: Any, tokenizer: Any, problems: list[Problem], responses: list[str]) -> torch.Tensor:
    return model(**rm_inputs(tokenizer, problems, responses)).logits[:, 0]


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[Pair]) -> dict[str, float]:
    """Share of pairs where chosen scores above rejected: overall and per negative kind."""
    import torch

    problems = [pair[0] for pair in pairs]
    with torch.inference_mode():
        chosen = _scores(model, tokenizer, problems, [pair[1] for pair in pairs])
        rejected = _scores(model, tokenizer, problems, [pair[2] for pair in pairs])
    wins = (chosen > rejected).tolist()
    result = {"all": sum(wins) / len(wins)}
    for kind in NEGATIVES:
        kind_wins = [win for win, pair in zip(wins, pairs, strict=True) if pair[3] == kind]
        result[kind] = sum(kind_wins) / max(1, len(kind_wins))
    return result


def _build(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    started = time.monotonic()
    base = build_tiny(seed)
    with torch_threads(2):
        tokenizer = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        rng = random.Random(seed)
        heldout = preference_pairs(load_toy("test", seed=seed), rng)
        steps, accuracy = _train(model, tokenizer, load_toy("train", seed=seed), heldout, rng)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    record = {
        "kind": "tiny-rm",
        "seed": seed,
        "base": base.name,
        "steps": steps,
        "heldout_pairs": len(heldout),
        "pairwise_accuracy": accuracy,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _train(
    model: Any, tokenizer: Any, train: list[Problem], heldout: list[Pair], rng: random.Random
) -> tuple[int, dict[str, float]]:
    """Bradley-Terry steps until held-out accuracy reaches TARGET, else MAX_STEPS and the best checked
    weights (held-out accuracy on wrong sums wobbles by several points between checks). A step count,
    not a time budget, so the result is deterministic."""
    import copy

    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98))
    best: tuple[int, dict[str, float], dict[str, Any]] = (0, {"all": 0.0}, {})
    with progress() as bar:
        task = bar.add_task("train tiny-rm", total=MAX_STEPS, status="")
        for step in range(1, MAX_STEPS + 1):
            model.train()
            pairs = preference_pairs(rng.sample(train, BATCH), rng, TRAIN_MIX)
            problems = [pair[0] for pair in pairs]
            scores = _scores(model, tokenizer, problems + problems, [p[1] for p in pairs] + [p[2] for p in pairs])
            loss = -torch.nn.functional.logsigmoid(scores[:BATCH] - scores[BATCH:]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(task, completed=step)
            if step % CHECK_EVERY == 0:
                model.eval()
                accuracy = pairwise_accuracy(model, tokenizer, heldout)
                bar.update(task, status=f"held-out pairwise {accuracy['all']:.0%}")
                bar.console.log(f"step {step}: held-out pairwise {accuracy}")
                if accuracy["all"] >= TARGET:
                    return step, accuracy
                if accuracy["all"] > best[1]["all"]:
                    best = (step, accuracy, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return best[0], best[1]
