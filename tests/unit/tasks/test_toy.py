"""The toy addition task: split sizes, disjointness, determinism and the exact prompt/target format."""

from __future__ import annotations

import pytest

from cadence.config import TaskConfig
from cadence.errors import ConfigError
from cadence.tasks import load_problems, toy_target
from cadence.tasks.toy import load_toy, toy_pairs


def test_split_sizes_disjoint_and_cover_all_pairs() -> None:
    train, test = set(toy_pairs("train")), set(toy_pairs("test"))
    assert (len(train), len(test)) == (9500, 500)
    assert not train & test
    assert len(train | test) == 100 * 100


def test_split_is_deterministic_per_seed() -> None:
    assert toy_pairs("test", seed=0) == toy_pairs("test", seed=0)
    assert toy_pairs("test", seed=0) != toy_pairs("test", seed=1)


def test_prompt_reference_and_target_format() -> None:
    problem = load_toy("test")[0]
    a, b = toy_pairs("test")[0]
    assert problem.text == f"What is {a}+{b}?"
    assert problem.reference == str(a + b)
    assert problem.kind == "math"
    assert problem.chat() == [{"role": "user", "content": problem.text}]
    assert toy_target(46) == " \\boxed{46}"


def test_load_problems_toy_split_and_limit() -> None:
    problems = load_problems(TaskConfig(name="toy", dataset="toy", split="test", limit=7))
    assert [p.text for p in problems] == [p.text for p in load_toy("test")[:7]]
    assert len({p.prompt_id for p in load_toy("train")}) == 9500


def test_unknown_toy_split_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="train, test"):
        load_problems(TaskConfig(name="toy", dataset="toy", split="validation"))
