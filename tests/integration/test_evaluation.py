"""Evaluation with the real engine, verifier and reward model: accuracy over k samples, RM win rates."""

import json
from pathlib import Path

import pytest

from cadence.app.evaluation import evaluate_chat, load_eval_problems
from cadence.app.wiring import math_accuracy, open_sampler, reward_model


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    with open_sampler("hf", tiny_model_dir) as sampler:
        yield sampler


def test_math_accuracy_matches_the_written_verdicts(engine, tmp_path: Path) -> None:
    problems = load_eval_problems("toy", "test", limit=40)
    out = tmp_path / "answers.jsonl"
    summary = math_accuracy(engine, problems, samples=4, temperature=1.0, max_tokens=14, out=out, dataset="toy")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.problems == len(rows) == 40 and summary.samples == 4
    assert all(len(row["answers"]) == len(row["rewards"]) == 4 for row in rows)
    assert summary.accuracy == pytest.approx(sum(sum(row["rewards"]) for row in rows) / 160)
    assert 0.05 < summary.accuracy < 0.9  # the seed is sometimes right (RL needs that headroom)


def test_greedy_uses_one_sample(engine) -> None:
    problems = load_eval_problems("toy", "test", limit=10)
    summary = math_accuracy(engine, problems, samples=8, temperature=0.0, max_tokens=14)
    assert summary.samples == 1


@pytest.mark.slow
def test_reward_model_win_rate_orders_baselines(engine) -> None:
    """The model wins more often against answers with no boxed result than against the gold answers."""
    problems = load_eval_problems("toy", "test", limit=60, kind="chat")
    rm = reward_model("tiny-rm")
    gold = [f" \\boxed{{{p.reference}}}" for p in problems]
    junk = [" I do not know" for _ in problems]
    versus_gold = evaluate_chat(engine, problems, rm, gold, temperature=1.0, max_tokens=14)
    versus_junk = evaluate_chat(engine, problems, rm, junk, temperature=1.0, max_tokens=14)
    assert versus_gold.accuracy < versus_junk.accuracy
    assert versus_junk.accuracy > 0.5
    assert versus_junk.length_normalized_reward is not None


@pytest.mark.needs_data("arena_hard")
def test_baseline_answers_come_from_references_or_a_model(tiny_model_dir: Path) -> None:
    from cadence.app.wiring import baseline_answers
    from cadence.errors import ConfigError

    problems = load_eval_problems("toy", "test", limit=5, kind="chat")
    assert baseline_answers(problems, None, "hf", 0.0, 1.0, 14) == [p.reference for p in problems]
    from_model = baseline_answers(problems, str(tiny_model_dir), "hf", 0.0, 1.0, 14)
    assert len(from_model) == 5 and all("boxed" in answer for answer in from_model)
    without = load_eval_problems("arena_hard", limit=3)
    with pytest.raises(ConfigError, match="--baseline MODEL"):
        baseline_answers(without, None, "hf", 0.0, 1.0, 14)
