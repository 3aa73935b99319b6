"""Where the application builds service cores: the engine kind, engines and evaluations.

`cadence.app.evaluation` takes a sampler, a verifier and a reward model through protocols; this module
builds the real ones (the inference engine, math-verify, the reward model) for `cadence eval`, the
launcher's before/after evaluations and the benchmarks. Service modules are imported inside functions so
that `cadence --help` and config errors stay instant.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.app.evaluation import EvalSummary, answers, evaluate_chat, evaluate_math, reference_answers

if TYPE_CHECKING:
    from cadence.config import EvalConfig
    from cadence.tasks import Problem

VERIFIER_PROCESSES = 2


def engine_kind(kind: str) -> str:
    """`auto` → `vllm` when vllm is importable, else `hf`; an unknown kind is a `ConfigError`."""
    from cadence.inference.factory import resolve_engine_kind

    return resolve_engine_kind(kind)


@dataclass
class EngineSampler:
    """An inference engine as the `Sampler` evaluation asks for (`engine` stays reachable: `load_weights`)."""

    engine: Any

    def sample(
        self, prompts: list[Any], *, n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> Sequence[Any]:
        from cadence.inference.engine import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        return self.engine.generate(prompts, params).completions


@contextmanager
def open_sampler(kind: str, model_dir: str | Path) -> Iterator[EngineSampler]:
    """An engine of `kind` on `model_dir`, closed on exit."""
    from cadence.inference.factory import create_engine

    engine = create_engine(kind, model_dir)
    try:
        yield EngineSampler(engine)
    finally:
        engine.close()


def math_accuracy(sampler: EngineSampler, problems: list[Problem], **options: Any) -> EvalSummary:
    """`evaluate_math` with math-verify as the verifier (its worker processes closed after)."""
    from cadence.reward.verifier import MathVerifier

    verifier = MathVerifier(processes=VERIFIER_PROCESSES)
    try:
        return evaluate_math(sampler, problems, verifier, **options)
    finally:
        verifier.close()


def reward_model(name: str) -> Any:
    """The reward model for chat evaluations: a directory, a hub id or a seed name (`tiny-rm`)."""
    from cadence.models import resolve_model
    from cadence.reward.reward_model import RewardModel

    return RewardModel(str(resolve_model(name)))


def baseline_answers(
    problems: list[Problem], baseline: str | None, kind: str, temperature: float, top_p: float, max_tokens: int
) -> list[str]:
    """The answers to beat: the `baseline` model's (a directory or seed name), else the dataset's references."""
    if baseline is None:
        return reference_answers(problems)
    from cadence.models import resolve_model

    with open_sampler(kind, resolve_model(baseline)) as sampler:
        return answers(sampler, problems, temperature, top_p, max_tokens)


def run_eval(
    spec: EvalConfig,
    model_dir: str | Path,
    *,
    seed: int = 0,
    max_tokens: int,
    out: Path | None = None,
    rm: str | None = None,
    baseline: str | None = None,
) -> EvalSummary:
    """Evaluate `model_dir` on `spec`'s eval set: math accuracy, or with `rm` the reward model's win rate
    against `baseline`'s answers (default: the dataset's references). `spec.engine` must be resolved."""
    from transformers.utils import logging as hf_logging

    from cadence.app.evaluation import load_eval_problems

    hf_logging.disable_progress_bar()  # the caller draws its own progress
    problems = load_eval_problems(spec.dataset, spec.split, spec.max_problems, seed=seed, kind="chat" if rm else None)
    sampling = {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": max_tokens}
    if rm:
        beaten = baseline_answers(problems, baseline, spec.engine, **sampling)
        with open_sampler(spec.engine, model_dir) as sampler:
            summary = evaluate_chat(sampler, problems, reward_model(rm), beaten, out=out, **sampling)
    else:
        with open_sampler(spec.engine, model_dir) as sampler:
            summary = math_accuracy(sampler, problems, samples=spec.samples, out=out, label=str(model_dir), **sampling)
    summary.model, summary.dataset = str(model_dir), spec.dataset
    return summary
