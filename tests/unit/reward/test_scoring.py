"""Routing, validation and admission of the scoring core, with the real verifier and a real tiny RM."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadence.errors import InvalidRequest, Overloaded, PermissionDenied, Unauthenticated
from cadence.reward.auth import ApiKeys
from cadence.reward.reward_model import RewardModel
from cadence.reward.scoring import Admission, Item, Limits, Scorer
from cadence.reward.verifier import SCORER_VERSION, MathVerifier


@pytest.fixture(scope="module")
def scorer(random_rm_dir: Path) -> Iterator[Scorer]:
    verifier = MathVerifier(processes=1, item_timeout=3.0)
    assert verifier.wait_ready()
    rm = RewardModel(str(random_rm_dir), device="cpu")
    yield Scorer(verifier, rm, Limits(max_items=8, max_response_chars=100, max_reference_chars=10))
    verifier.close()


def test_mixed_tasks_are_routed_and_keep_their_order(scorer: Scorer) -> None:
    items = [
        Item("What is 1+1?", " \\boxed{2}", "2", "math"),
        Item("What is 1+1?", " \\boxed{2}", "", "chat"),
        Item("What is 1+1?", " \\boxed{3}", "2", "math"),
        Item("What is 2+2?", " 4", "", "chat"),
    ]
    results = scorer.score(items)
    assert [(r.task, r.reason) for r in results] == [
        ("math", "correct"),
        ("chat", "scored"),
        ("math", "incorrect"),
        ("chat", "scored"),
    ]
    assert results[0].reward == 1.0 and results[2].reward == 0.0
    assert results[0].scorer_version == SCORER_VERSION
    assert results[1].scorer_version == f"rm:{scorer.reward_model.name}"
    assert results[1].reward == pytest.approx(scorer.reward_model.score([("What is 1+1?", " \\boxed{2}")])[0])


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "items: empty"),
        ([Item("p", "r", "1")] * 9, "items: 9 items exceeds the limit of 8"),
        ([Item("p", "r", "1"), Item("p", "r", "1", "poetry")], "items[1].task: unknown task 'poetry'"),
        ([Item("p", "r", "  ")], "items[0].reference: required for task 'math'"),
        ([Item("p", "r", "1"), Item("p", "x" * 101, "1")], "items[1].response: 101 characters exceeds"),
        ([Item("p", "r", "1" * 11)], "items[0].reference: 11 characters"),
        ([Item("p\ud800", "r", "1")], "items[0].prompt: not valid Unicode"),
    ],
)
def test_invalid_items_name_the_index_and_field(scorer: Scorer, items: list[Item], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        scorer.score(items)


def test_chat_without_a_reward_model_is_refused_clearly() -> None:
    math_only = Scorer(verifier=None)
    with pytest.raises(InvalidRequest, match=r"items\[0\].task: this instance cannot score 'chat'"):
        math_only.validate([Item("p", "r", "", "chat")])


def test_admission_refuses_beyond_capacity_and_waits_when_asked() -> None:
    admission = Admission(capacity=4)
    admission.acquire(3, wait=False, retry_after=2.0)
    with pytest.raises(Overloaded) as caught:
        admission.acquire(2, wait=False, retry_after=2.0)
    assert caught.value.retry_after == 2.0
    waiter = threading.Thread(target=admission.acquire, args=(2,), kwargs={"wait": True, "retry_after": 1.0})
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    admission.release(3)
    waiter.join(2.0)
    assert not waiter.is_alive() and admission.in_flight == 2
    admission.release(2)
    admission.acquire(10, wait=False, retry_after=1.0)  # larger than capacity, admitted when idle
    assert admission.in_flight == 10


def test_api_keys() -> None:
    off = ApiKeys()
    off.check_header(None)
    keys = ApiKeys(["alpha", "beta"])
    keys.check_header("Bearer beta")
    keys.check_token("alpha")
    with pytest.raises(Unauthenticated):
        keys.check_header(None)
    with pytest.raises(Unauthenticated):
        keys.check_header("Basic YWxwaGE=")
    with pytest.raises(PermissionDenied):
        keys.check_header("Bearer gamma")


def test_api_keys_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nalpha\n\nbeta\n")
    keys = ApiKeys.load("gamma", path)
    for key in ("alpha", "beta", "gamma"):
        keys.check_token(key)
    with pytest.raises(PermissionDenied):
        keys.check_token("# team keys")
