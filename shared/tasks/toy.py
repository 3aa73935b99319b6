"""The toy addition task of TOY.md: `What is a+b?` → ` \\boxed{a+b}` with a, b in 0..99.

All 10,000 ordered pairs are shuffled with a seeded RNG; the first 500 are the test split and the
other 9,500 the training split, so the two are disjoint and the same for a given seed everywhere.
"""

from __future__ import annotations

import random

from cadence.errors import ConfigError
from cadence.tasks.problem import Problem

MAX_OPERAND = 99
TEST_SIZE = 500
SPLITS = ("train", "test")


def toy_prompt(a: int, b: int) -> str:
    """The prompt text, exactly as the seed model was trained on it."""
    return f"What is {a}+{b}?"


def toy_target(answer: int | str) -> str:
    """The SFT completion for a gold answer (EOS is appended by the trainer)."""
    return f" \\boxed{{{answer}}}"


def toy_pairs(split: str, seed: int = 0) -> list[tuple[int, int]]:
    """The (a, b) operands of one split, in the seeded shuffled order."""
    if split not in SPLITS:
        raise ConfigError(f"toy task split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[:TEST_SIZE] if split == "test" else pairs[TEST_SIZE:]


def load_toy(split: str = "train", seed: int = 0) -> list[Problem]:
    """The toy problems of a split; `reference` is the sum as a decimal string."""
    return [
        Problem(prompt_id=f"toy-{a}+{b}", kind="math", text=toy_prompt(a, b), reference=str(a + b))
        for a, b in toy_pairs(split, seed)
    ]
