"""Held-out evaluation: math accuracy averaged over k samples per problem, and reward-model win rates for chat.

Accuracy follows the paper: k samples per problem (it used k = 50, temperature 0.6, top-p 0.9), each
checked by math-verify, averaged. Chat quality is the reward model's win rate of the model's answers
against reference answers (the seed's, or those a dataset ships), plus the length-normalised reward the
paper selects checkpoints by. Every answer and verdict goes to a per-problem JSONL.

This module imports no service: it takes a sampler, a verifier and a reward model through the protocols
below, and `cadence.app.wiring` builds the real ones (the inference engine, math-verify, the reward model).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cadence.config import TaskConfig
from cadence.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cadence.tasks import Problem

BATCH_PROMPTS = 128
SEED = 1234
"""Sampling seed of every evaluation: two evaluations of the same weights give the same answers."""


class Sample(Protocol):
    """One answer: its text and token ids."""

    text: str
    token_ids: list[int]


class Completion(Protocol):
    """The answers to one prompt."""

    samples: Sequence[Sample]


class Sampler(Protocol):
    """What evaluation asks of an engine: `n` answers to each prompt (text or chat messages)."""

    def sample(
        self, prompts: list[Any], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> Sequence[Completion]: ...


class Verdict(Protocol):
    reward: float
    reason: str


class Verifier(Protocol):
    """Checks `(answer, reference)` pairs: math-verify."""

    def verify_many(self, pairs: list[tuple[str, str]]) -> Sequence[Verdict]: ...


class PairScorer(Protocol):
    """Scores `(prompt, answer)` pairs: a reward model."""

    def score(self, pairs: list[tuple[str, str]]) -> list[float]: ...


@dataclass
class EvalSummary:
    """One evaluation's headline figures."""

    model: str
    dataset: str
    problems: int
    samples: int
    accuracy: float
    """Math: mean correctness over problems × samples. Chat: win rate against the reference answers."""
    mean_length: float
    """Mean response length in tokens."""
    seconds: float
    length_normalized_reward: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def load_eval_problems(
    dataset: str, split: str = "test", limit: int | None = None, seed: int = 0, kind: str | None = None
) -> list[Problem]:
    """Problems of an eval set: `toy`, `math500`, `amc23`, `alpaca_eval`, `arena_hard`, or a JSONL path."""
    from cadence.tasks import load_problems

    kind = kind or ("chat" if dataset in ("alpaca_eval", "arena_hard") else "math")
    task = TaskConfig(name=f"eval-{Path(dataset).stem}", kind=kind, dataset=dataset, split=split, limit=limit)
    return load_problems(task, seed=seed)


def _generate(
    sampler: Sampler, problems: list[Problem], k: int, temperature: float, top_p: float, max_tokens: int
) -> list[Completion]:
    """All completions, in batches, with a progress bar on stderr."""
    from rich.progress import Progress

    prompts = [problem.chat() for problem in problems]  # the engine renders them (`cadence.chat`)
    completions: list[Completion] = []
    with Progress(transient=True) as bar:
        task = bar.add_task("generating", total=len(prompts))
        for start in range(0, len(prompts), BATCH_PROMPTS):
            batch = prompts[start : start + BATCH_PROMPTS]
            completions.extend(
                sampler.sample(batch, n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=SEED)
            )
            bar.advance(task, len(batch))
    return completions


def evaluate_math(
    sampler: Sampler,
    problems: list[Problem],
    verifier: Verifier,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 64,
    out: Path | None = None,
    label: str = "",
    dataset: str = "",
) -> EvalSummary:
    """Accuracy averaged over `samples` per problem; greedy decoding uses one sample."""
    if any(problem.kind != "math" for problem in problems):
        raise InvalidRequest("evaluate_math takes math problems only; use evaluate_chat for chat prompts")
    k = 1 if temperature == 0 else samples
    started = time.monotonic()
    completions = _generate(sampler, problems, k, temperature, top_p, max_tokens)
    pairs = [(s.text, p.reference) for p, c in zip(problems, completions, strict=True) for s in c.samples]
    verdicts = verifier.verify_many(pairs)
    correct = [v.reward for v in verdicts]
    lengths = [len(s.token_ids) for c in completions for s in c.samples]
    if out is not None:
        _write_rows(out, problems, completions, [(v.reward, v.reason) for v in verdicts], k)
    return EvalSummary(
        model=label,
        dataset=dataset,
        problems=len(problems),
        samples=k,
        accuracy=sum(correct) / max(1, len(correct)),
        mean_length=sum(lengths) / max(1, len(lengths)),
        seconds=time.monotonic() - started,
    )


def _write_rows(out: Path, problems, completions, verdicts, k: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for index, (problem, completion) in enumerate(zip(problems, completions, strict=True)):
            answers = [sample.text for sample in completion.samples]
            rows = verdicts[index * k : (index + 1) * k]
            handle.write(
                json.dumps(
                    {
                        "prompt_id": problem.prompt_id,
                        "prompt": problem.text,
                        "reference": problem.reference,
                        "answers": answers,
                        "rewards": [r for r, _ in rows],
                        "reasons": [reason for _, reason in rows],
                    }
                )
                + "\n"
            )


def length_normalized(reward: float, length: int) -> float:
    """Reward per answer token, ordered right for either sign: `r / n` when r ≥ 0, `r · n` when r < 0.

    Plain `r / n` moves a negative score towards 0 as the answer grows, so it ranks longer answers higher
    whenever the RM's scores are negative (Athene-RM's often are). This falls with length at any fixed reward,
    rises with reward at any fixed length (continuous at 0), and is `r / n` for non-negative scores."""
    return reward / length if reward >= 0 else reward * length


def evaluate_chat(
    sampler: Sampler,
    problems: list[Problem],
    reward_model: PairScorer,
    baseline_answers: list[str],
    *,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_tokens: int = 512,
    out: Path | None = None,
    label: str = "",
    dataset: str = "",
) -> EvalSummary:
    """Reward-model win rate of the model's answers against `baseline_answers` (a tie counts half).

    `length_normalized_reward` is the mean over prompts of `length_normalized(reward, answer tokens)`: a model
    that wins only by writing more scores lower on it, which is why the paper selects checkpoints by it.
    """
    if len(baseline_answers) != len(problems):
        raise InvalidRequest(f"{len(baseline_answers)} baseline answers for {len(problems)} prompts")
    started = time.monotonic()
    completions = _generate(sampler, problems, 1, temperature, top_p, max_tokens)
    answers = [c.samples[0].text for c in completions]
    lengths = [max(1, len(c.samples[0].token_ids)) for c in completions]
    prompts = [p.text for p in problems]
    ours = reward_model.score(list(zip(prompts, answers, strict=True)))
    theirs = reward_model.score(list(zip(prompts, baseline_answers, strict=True)))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as handle:
            for problem, answer, base, a, b in zip(problems, answers, baseline_answers, ours, theirs, strict=True):
                row = {
                    "prompt_id": problem.prompt_id,
                    "answer": answer,
                    "baseline": base,
                    "reward": a,
                    "baseline_reward": b,
                }
                handle.write(json.dumps(row) + "\n")
    return EvalSummary(
        model=label,
        dataset=dataset,
        problems=len(problems),
        samples=1,
        accuracy=sum(wins) / max(1, len(wins)),
        mean_length=sum(lengths) / max(1, len(lengths)),
        seconds=time.monotonic() - started,
        length_normalized_reward=sum(map(length_normalized, ours, lengths)) / max(1, len(ours)),
    )


def reference_answers(problems: list[Problem]) -> list[str]:
    """The dataset's reference answers (AlpacaEval ships GPT-4's), the default answers to beat."""
    references = [p.reference for p in problems]
    if any(r is None for r in references):
        raise ConfigError("this dataset has no reference answers: pass --baseline MODEL (e.g. the seed)")
    return [str(r) for r in references]


def answers(sampler: Sampler, problems: list[Problem], temperature: float, top_p: float, max_tokens: int) -> list[str]:
    """One answer per problem: a baseline model's answers to beat."""
    return [c.samples[0].text for c in _generate(sampler, problems, 1, temperature, top_p, max_tokens)]
