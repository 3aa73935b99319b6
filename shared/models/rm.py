"""`cadence seed-model tiny-rm`: a tiny reward model for the toy domain that checks the sum.

A `LlamaForSequenceClassification` (one score) on the toy tokenizer, trained with the Bradley-Terry
loss on synthetic preference pairs: for a toy problem, the concise correct answer ` \\boxed{N}` is
preferred to (a) a wrong boxed number (near misses: carry slips, ±1, ±10, ±100, a changed or swapped
digit, and random numbers), (b) no boxed answer, and (c) a rambling answer that ends with the right box.
Inputs are rendered with the tokenizer's chat template, exactly as the reward service renders (prompt,
response). Held-out pairs come from the toy test split.

Telling (a) apart means checking the sum, so the backbone is the tiny SFT seed trained on for
`BACKBONE_SFT_STEPS` more steps of its own recipe with the rate decaying to 0 (cosine): the seed stops at
~25 % greedy accuracy to leave RL headroom; this backbone answers ~94 % of the test split. Then
Bradley-Terry on mostly wrong-sum negatives for up to `MAX_STEPS` steps (warm-up, cosine), checked on
held-out pairs every `CHECK_EVERY` steps, the best check on wrong sums kept. 100 steps on the bare seed
ranked a wrong sum below the right one 60-68 % of the time, and RM-trained runs learnt format, not sums.

Measured 2026-12-02 on the 2-core CPU sandbox (the build alone under the heavy lock, load 2.7): held-out
wrong-sum pairwise accuracy 65.7 / 66.9 / 80.7 / 86.7 / 88.6 / 89.2 / 94.0 % at steps 250 ... 1750, where
it stopped (overall 98.0 %, unboxed and rambling 100 %); the whole build 377 s. A fresh draw of 500 wrong-sum
pairs: 92.0 %; the seed's own samples (a right against a wrong T = 1 sample, 176 test problems): 88.6 %.

Run: `cadence seed-model tiny-rm [--seed 0] [--force]` (prints the model directory last).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.models.cache import MARKER, cached_build
from cadence.models.seed import build_tiny
from cadence.models.toytrain import greedy_accuracy, progress, sft_tensors, torch_threads
from cadence.paths import models_dir
from cadence.tasks.problem import Problem
from cadence.tasks.toy import load_toy, toy_target

if TYPE_CHECKING:
    import torch

RECIPE = 2
"""Bumped when the recipe changes, so cached copies of an older one are rebuilt (1: the bare seed, 100 steps)."""
BACKBONE_SFT_STEPS = 600
"""Greedy accuracy on the toy test split 26.2 -> 93.8 % (2026-12-02, the build's record)."""
BATCH = 64
LR = 1e-3
WARMUP = 50
MAX_STEPS = 2000
CHECK_EVERY = 250
TARGET = 0.90
"""Stop once held-out pairwise accuracy reaches it overall and on wrong sums."""
NEGATIVES = ("wrong", "unboxed", "rambling")
TRAIN_MIX = (0.9, 0.05, 0.05)
"""Share of each negative kind in training batches: the format negatives are learnt in a few steps,
the wrong sums are what takes practice."""
Pair = tuple[Problem, str, str, str]
"""(problem, chosen response, rejected response, negative kind)."""
_FILLER = ("it", "is", "what", "that", "this", "the", "so", "as", "a", "bad", "idea", "hide", "to", "do")


def build_tiny_rm(seed: int = 0, force: bool = False) -> Path:
    """The tiny toy reward model, cached under `models_dir()/tiny-rm-seed{seed}`; a copy built by an older
    recipe (the marker's `recipe` is not `RECIPE`) is rebuilt."""
    name = f"tiny-rm-seed{seed}"
    marker = models_dir() / name / MARKER
    stale = marker.is_file() and json.loads(marker.read_text()).get("recipe") != RECIPE
    return cached_build(name, lambda out: _build(out, seed), force or stale)


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A wrong answer to a + b, mostly a near miss: a dropped or spurious carry, ±1, ±10, ±100, one digit
    changed, the digits swapped, or (one time in eight) any number up to 198."""
    answer, digits = a + b, str(a + b)
    kind = rng.randrange(8)
    if kind == 0:
        wrong = answer + rng.choice([-1, 1])
    elif kind == 1:
        wrong = answer + rng.choice([-10, 10])
    elif kind == 2:
        wrong = answer + rng.choice([-100, 100])
    elif kind == 3:
        wrong = answer + rng.choice([-2, 2, -9, 9, -11, 11, -20, 20])
    elif kind == 4:  # the carry dropped (digit-wise sums mod 10), or one added where there is none
        no_carry = (a // 10 + b // 10) % 10 * 10 + (a + b) % 10
        wrong = no_carry if no_carry != answer else answer + 10
    elif kind == 5:
        wrong = int(digits[::-1])
    elif kind == 6:
        place = 10 ** rng.randrange(len(digits))
        wrong = answer + place * rng.choice([d for d in range(-9, 10) if d])
    else:
        wrong = rng.randint(0, 198)
    return wrong if wrong >= 0 and wrong != answer else answer + rng.choice([1, 10, 11])


def rejected_answer(problem: Problem, kind: str, rng: random.Random) -> str:
    """A response worse than ` \\boxed{answer}`: a wrong number, no box, or rambling."""
    answer = int(problem.reference or 0)
    if kind == "wrong":
        a, b = (int(x) for x in problem.prompt_id.removeprefix("toy-").split("+"))
        return toy_target(wrong_sum(a, b, rng))
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
    from transformers import AutoTokenizer

    started = time.monotonic()
    base = build_tiny(seed)
    with torch_threads(2):
        tokenizer = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(seed)
        test = load_toy("test", seed=seed)
        model, backbone_accuracy = _arithmetic_backbone(base, tokenizer, seed, test)
        rng = random.Random(seed)
        heldout = preference_pairs(test, rng)
        steps, accuracy = _train(model, tokenizer, load_toy("train", seed=seed), heldout, rng)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    record = {
        "kind": "tiny-rm",
        "recipe": RECIPE,
        "seed": seed,
        "base": base.name,
        "backbone": {"sft_steps": BACKBONE_SFT_STEPS, "greedy_accuracy": backbone_accuracy},
        "steps": steps,
        "heldout_pairs": len(heldout),
        "pairwise_accuracy": accuracy,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _arithmetic_backbone(base: Path, tokenizer: Any, seed: int, test: list[Problem]) -> tuple[Any, float]:
    """The seed after `BACKBONE_SFT_STEPS` more steps of its own recipe, the rate decaying to 0 (cosine), as a
    one-score sequence classifier (a fresh head), and the backbone's greedy accuracy on the toy test split."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

    from cadence.models import seed as recipe

    model = AutoModelForCausalLM.from_pretrained(base)
    train = load_toy("train", seed=seed)
    inputs, labels = sft_tensors(tokenizer, [p.text for p in train], [toy_target(p.reference or "") for p in train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.LR, betas=recipe.BETAS)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / BACKBONE_SFT_STEPS))
    )
    recipe.sft_steps(model, optimizer, cosine, torch.Generator().manual_seed(seed), inputs, labels, BACKBONE_SFT_STEPS)
    model.eval()
    accuracy = greedy_accuracy(model, tokenizer, test)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        classifier = LlamaForSequenceClassification.from_pretrained(folder, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    return classifier, accuracy


def _margins(model: Any, tokenizer: Any, pairs: list[Pair]) -> list[torch.Tensor]:
    """Chosen minus rejected score, one forward pass per negative kind: a rambling answer is twice as long as
    the others, and padding every row of a batch to it doubled the cost of a step."""
    margins = []
    for kind in NEGATIVES:
        group = [pair for pair in pairs if pair[3] == kind]
        if group:
            problems = [pair[0] for pair in group]
            scores = _scores(model, tokenizer, problems + problems, [p[1] for p in group] + [p[2] for p in group])
            margins.append(scores[: len(group)] - scores[len(group) :])
    return margins


def _train(
    model: Any, tokenizer: Any, train: list[Problem], heldout: list[Pair], rng: random.Random
) -> tuple[int, dict[str, float]]:
    """Bradley-Terry steps until held-out accuracy reaches TARGET overall and on wrong sums, else MAX_STEPS
    and the best check on wrong sums. A step count, not a time budget, so the result is deterministic."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / MAX_STEPS))
    )
    best: tuple[int, dict[str, float], dict[str, Any]] = (0, {"all": 0.0, "wrong": 0.0}, {})
    with progress() as bar:
        task = bar.add_task("train tiny-rm", total=MAX_STEPS, status="")
        for step in range(1, MAX_STEPS + 1):
            model.train()
            pairs = preference_pairs(rng.sample(train, BATCH), rng, TRAIN_MIX)
            loss = -torch.nn.functional.logsigmoid(torch.cat(_margins(model, tokenizer, pairs))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.update(task, completed=step)
            if step % CHECK_EVERY == 0:
                model.eval()
                accuracy = pairwise_accuracy(model, tokenizer, heldout)
                bar.update(task, status=f"held-out pairwise {accuracy['all']:.0%}, wrong sums {accuracy['wrong']:.0%}")
                bar.console.log(f"step {step}: held-out pairwise {accuracy}")
                if min(accuracy["all"], accuracy["wrong"]) >= TARGET:
                    return step, accuracy
                if accuracy["wrong"] > best[1]["wrong"]:
                    best = (step, accuracy, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return best[0], best[1]
