"""The service agrees with math-verify's own reference results at least as often as math-verify alone does.

The cases are math-verify's own test vectors (`data/math_verify_cases.json`: every parametrized
(gold, pred, expected) of its 0.9.0 test suite, with attribution). "Alone" is `verify(parse(gold),
parse(pred))` with math-verify's defaults; the service is the real `MathVerifier` pool, which cuts the
response, wraps the reference and may take its integer shortcut before math-verify sees anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadence.reward.verifier import MathVerifier

CASES = json.loads((Path(__file__).parent / "data" / "math_verify_cases.json").read_text())["cases"]
MULTI_ANSWER_FILES = ("test_boxed.py", "test_numina_cases.py", "test_open_thoughts.py")


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    pool = MathVerifier(processes=2, item_timeout=10.0)
    assert pool.wait_ready(), "math-verify workers did not start"
    yield pool
    pool.close()


def _alone(gold: str, pred: str) -> int:
    from math_verify import parse, verify

    try:
        return int(bool(verify(parse(gold), parse(pred))))
    except Exception:  # math-verify's own timeout or a parser failure: no credit, as the service gives
        return 0


def _agreement(verifier: MathVerifier, cases: list[dict]) -> tuple[int, int]:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    alone = sum(_alone(c["gold"], c["pred"]) == c["expected"] for c in cases)
    verdicts = verifier.verify_many([(c["pred"], c["gold"]) for c in cases])
    service = sum(int(v.reward == 1.0) == c["expected"] for v, c in zip(verdicts, cases, strict=True))
    print(f"math-verify's reference results matched on {len(cases)} cases: alone {alone}, service {service}")
    return alone, service


def test_multi_answer_cases_agree_at_least_as_often(verifier: MathVerifier) -> None:
    cases = [c for c in CASES if c["source"].split("::")[0] in MULTI_ANSWER_FILES]
    assert len(cases) >= 60
    alone, service = _agreement(verifier, cases)
    assert service >= alone


@pytest.mark.slow  # all 274 cases, both ways: about a minute on 2 busy cores
def test_all_cases_agree_at_least_as_often(verifier: MathVerifier) -> None:
    alone, service = _agreement(verifier, CASES)
    assert service >= alone


@pytest.mark.parametrize(
    ("response", "reference", "reason"),
    [
        ("\\boxed{(1, 2)}, \\boxed{(2, 1)}", "(1,2),(2,1)", "correct"),
        ("The pairs are \\boxed{1} and \\boxed{2}.", "\\{1, 2\\}", "correct"),
        ("x = \\boxed{255}. Final Answer: The final answer is $10,455$. I hope it is correct.", "10455", "correct"),
        ("\\boxed{555", "55", "no_answer"),
        ("so \\boxed{55", "55", "no_answer"),
        ("\\boxed{55}", "55", "correct"),
    ],
)
def test_what_math_verify_reads_is_what_the_service_scores(
    verifier: MathVerifier, response: str, reference: str, reason: str
) -> None:
    assert verifier.verify(response, reference).reason == reason
