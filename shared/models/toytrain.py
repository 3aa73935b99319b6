"""Shared pieces of the seed-model builders: toy batches, toy accuracy, progress display.

Accuracy here is the toy reward of TOY.md: exact match of the last `\\boxed{}` integer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cadence.tasks.problem import Problem
from cadence.tasks.sources import last_boxed

if TYPE_CHECKING:
    import torch
    from rich.progress import Progress
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_NEW_TOKENS = 14


@dataclass(frozen=True)
class ToyScores:
    """Held-out figures of a causal LM on the toy task."""

    greedy: float
    sampled: float
    """Mean accuracy of the samples at temperature 1."""
    pass_at_k: float
    k: int


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a build with `count` intra-op threads, then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress() -> Progress:
    """A rich progress bar on stderr (stdout is left for the model path the CLI prints)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
    )


def sft_tensors(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` (BOS prompt completion EOS) and labels that count completions only."""
    import torch

    rows, labels = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt).input_ids
        completion_ids = [*tokenizer(completion, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for index, (row, label) in enumerate(zip(rows, labels, strict=True)):
        input_ids[index, : len(row)] = torch.tensor(row)
        target[index, : len(label)] = torch.tensor(label)
    return input_ids, target


def completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions per prompt: greedy when `samples` is 1, else temperature 1 (no top-k/p)."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    sampling = samples > 1
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=sampling,
            temperature=1.0 if sampling else None,
            top_k=0 if sampling else None,
            top_p=1.0 if sampling else None,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return [texts[index * samples : (index + 1) * samples] for index in range(len(prompts))]


def is_correct(completion: str, reference: str | None) -> bool:
    """The toy reward: the last boxed answer equals the reference exactly."""
    return reference is not None and last_boxed(completion) == reference


def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> float:
    """Fraction of problems answered correctly by greedy decoding."""
    outputs = completions(model, tokenizer, [problem.text for problem in problems])
    hits = sum(is_correct(out[0], problem.reference) for out, problem in zip(outputs, problems, strict=True))
    return hits / len(problems)


def toy_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], k: int = 8, seed: int = 0
) -> ToyScores:
    """Greedy accuracy, mean sampled accuracy (T = 1) and pass@k on held-out problems."""
    sampled = completions(model, tokenizer, [problem.text for problem in problems], samples=k, seed=seed)
    hits = [
        [is_correct(text, problem.reference) for text in outs] for outs, problem in zip(sampled, problems, strict=True)
    ]
    return ToyScores(
        greedy=greedy_accuracy(model, tokenizer, problems),
        sampled=sum(sum(row) for row in hits) / (k * len(problems)),
        pass_at_k=sum(any(row) for row in hits) / len(problems),
        k=k,
    )
