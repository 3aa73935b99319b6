"""The length-normalised reward that chat checkpoints are selected by: longer never helps, whatever the sign."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cadence.app.evaluation import length_normalized

REWARDS = st.floats(min_value=-100, max_value=100, allow_nan=False)
LENGTHS = st.integers(min_value=1, max_value=4096)


def test_a_longer_answer_with_the_same_negative_score_ranks_lower() -> None:
    assert length_normalized(-2.0, 200) < length_normalized(-2.0, 20)
    assert length_normalized(2.0, 200) < length_normalized(2.0, 20)
    assert length_normalized(3.0, 30) == 0.1


@given(REWARDS, LENGTHS, LENGTHS)
def test_never_rises_with_length(reward: float, short: int, extra: int) -> None:
    assert length_normalized(reward, short + extra) <= length_normalized(reward, short)


@given(REWARDS, REWARDS, LENGTHS)
def test_never_falls_with_reward(low: float, high: float, length: int) -> None:
    low, high = min(low, high), max(low, high)
    assert length_normalized(low, length) <= length_normalized(high, length)
