"""The length-collapse signal in the trainer's metrics: which samples end with EOS, right and wrong apart."""

from __future__ import annotations

import math

from cadence.trainer.loop import _termination
from cadence.trainer.update import Group

EOS = 2


def group(task: str, completions: list[list[int]], rewards: list[float], logps: list[list[float]]) -> Group:
    return Group("p", task, 0, [1, 5], completions, rewards, logps)


def test_eos_rates_and_log_probs_split_right_from_wrong() -> None:
    """Right answers that run to the cap without EOS while wrong ones stop: the collapse's signature."""
    math_group = group(
        "math",
        [[7, 8, EOS], [7, 8, 9], [7, EOS], [7, 9]],
        [1.0, 1.0, 0.0, 0.0],
        [[-0.1, -0.1, -0.5], [-0.1, -0.1, -0.1], [-0.2, -1.5], [-0.2, -0.2]],
    )
    chat = group("chat", [[7, EOS]], [5.0], [[-0.1, -9.0]])  # chat samples are not counted
    result = _termination([math_group, chat], EOS)
    assert result["eos_rate_correct"] == 0.5 and result["eos_rate_incorrect"] == 0.5
    assert math.isclose(result["eos_logp_correct"], -0.5) and math.isclose(result["eos_logp_incorrect"], -1.5)


def test_no_math_samples_or_no_eos_gives_none() -> None:
    result = _termination([group("math", [[7, 8]], [1.0], [])], EOS)
    assert result == {"eos_rate_correct": 0.0, "eos_rate_incorrect": None, "eos_logp_correct": None,
                      "eos_logp_incorrect": None}  # fmt: skip
