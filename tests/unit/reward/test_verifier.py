"""The math verifier: bounded answer extraction, reference wrapping, the process pool and its deadlines.

Real math-verify throughout. The MATH-500 tests check every gold solution against its own gold answer
(must be correct) and against another problem's gold answer (must be incorrect), and print the agreement.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from cadence.reward.verifier import (
    MAX_ANSWER_CHARS,
    TAIL_CHARS,
    MathVerifier,
    check,
    extract_answer,
    last_boxed,
    wrap_reference,
)

PATHOLOGICAL = {
    "100 KB of text": "x" * 100_000,
    "10,000 nested braces": "{" * 10_000 + "}" * 10_000,
    "10,000 nested braces in a box": "\\boxed{" + "{" * 10_000 + "}" * 10_000 + "}",
    "'9' * 100000": "9" * 100_000,
    "boxed '9' * 100000": "\\boxed{" + "9" * 100_000 + "}",
    "unterminated box": "The answer is \\boxed{",
    "unterminated box, 100 KB": "\\boxed{" + "x" * 100_000,
    "many unterminated boxes": "\\boxed{" * 20_000,
    "a tower of powers": "\\boxed{9^{9^{9^{9}}}}",
}


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    pool = MathVerifier(processes=2, item_timeout=3.0)
    assert pool.wait_ready(), "math-verify workers did not start"
    yield pool
    pool.close()


def math500() -> list[dict]:
    from cadence.tasks.benchmarks import benchmark_file

    path = benchmark_file("math500")
    if path is None:
        pytest.skip("math500.jsonl is not in CADENCE_DATA_DIR or ../shared/data")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_last_boxed_takes_the_last_complete_box_with_nested_braces() -> None:
    text = "first \\boxed{1} then \\boxed{\\frac{1}{2}} and a stray \\boxed{"
    assert last_boxed(text) == "\\frac{1}{2}"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed {7}") == "7"


def test_extraction_is_bounded() -> None:
    assert last_boxed("\\boxed{" + "9" * (MAX_ANSWER_CHARS + 1) + "}") is None
    tail = extract_answer("x" * 100_000)
    assert tail is not None and len(tail) == TAIL_CHARS
    assert extract_answer("   ") is None
    assert extract_answer("\\boxed{ }" + "x" * TAIL_CHARS) is None  # an empty box before the tail: no answer
    long = "\\boxed{12}\n" + "x" * TAIL_CHARS + "\nso \\boxed{7}"
    assert extract_answer(long) == long[-TAIL_CHARS - 1 :].split("\n", 1)[1]  # the tail, from a line start


def test_reference_wrapping_makes_bare_latex_parse() -> None:
    assert wrap_reference("\\dfrac{1}{9}") == "\\boxed{\\dfrac{1}{9}}"
    assert wrap_reference("$5$") == "$5$"
    assert check("\\boxed{\\frac{1}{9}}", wrap_reference("\\dfrac{1}{9}")).reason == "correct"
    assert check("\\boxed{0.5}", wrap_reference("\\frac12")).reason == "correct"
    assert check("\\boxed{3}", wrap_reference("4")).reason == "incorrect"


def test_reasons(verifier: MathVerifier) -> None:
    assert verifier.verify("so \\boxed{42}", "42").reason == "correct"
    assert verifier.verify("so \\boxed{41}", "42").reason == "incorrect"
    assert verifier.verify("", "42").reason == "no_answer"
    assert verifier.verify("I do not know", "42").reason == "no_answer"
    assert verifier.verify("\\boxed{42}", "}").reason == "error"


def test_math500_gold_solutions_agree_with_gold_answers(verifier: MathVerifier) -> None:
    rows = math500()
    started = time.monotonic()
    verdicts = verifier.verify_many([(row["solution"], row["answer"]) for row in rows])
    reasons = Counter(verdict.reason for verdict in verdicts)
    agreement = reasons["correct"] / len(rows)
    print(f"\nMATH-500 gold vs gold: {agreement:.1%} correct {dict(reasons)} in {time.monotonic() - started:.1f}s")
    assert agreement >= 0.99


def test_math500_perturbed_answers_are_incorrect(verifier: MathVerifier) -> None:
    rows = math500()
    pairs = []
    for index, row in enumerate(rows):
        other = rows[(index + len(rows) // 2) % len(rows)]["answer"]
        if other.replace(" ", "") != row["answer"].replace(" ", ""):
            pairs.append((f"The answer is $\\boxed{{{other}}}$.", row["answer"]))
    reasons = Counter(verdict.reason for verdict in verifier.verify_many(pairs))
    agreement = reasons["incorrect"] / len(pairs)
    print(f"\nMATH-500 perturbed: {agreement:.1%} incorrect of {len(pairs)} {dict(reasons)}")
    assert reasons["correct"] <= 0.01 * len(pairs)
    assert agreement >= 0.97


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_inputs_are_bounded_and_the_pool_recovers(verifier: MathVerifier, name: str) -> None:
    started = time.monotonic()
    verdict = verifier.verify(PATHOLOGICAL[name], "1")
    elapsed = time.monotonic() - started
    assert verdict.reason in ("incorrect", "no_answer", "timeout")
    assert elapsed < verifier.item_timeout + 2.0, f"{name} took {elapsed:.1f}s"
    assert verifier.verify("\\boxed{2}", "2").reason == "correct"


def test_a_stuck_item_times_out_and_its_worker_is_replaced(verifier: MathVerifier) -> None:
    restarts = verifier.restarts
    started = time.monotonic()
    verdicts = verifier.verify_many([("\\boxed{10^{10^{10}}}", "1"), ("\\boxed{7}", "7")])
    assert [v.reason for v in verdicts] == ["timeout", "correct"]
    assert time.monotonic() - started < verifier.item_timeout + 2.0
    assert verifier.restarts == restarts + 1
    assert verifier.wait_ready(30.0)


def test_a_stuck_item_does_not_block_other_callers(verifier: MathVerifier) -> None:
    stuck = threading.Thread(target=verifier.verify, args=("\\boxed{9^{9^{9^{9}}}}", "1"))
    stuck.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert verifier.verify("\\boxed{5}", "5").reason == "correct"
    assert time.monotonic() - started < 1.0
    stuck.join()


def test_a_worker_killed_from_outside_is_replaced(verifier: MathVerifier) -> None:
    assert verifier.wait_ready(30.0)
    worker = verifier._workers[0]
    assert worker is not None
    worker.process.kill()
    worker.process.join()
    # fractions, not integers: integers are settled without the pool (integer_verdict)
    verdicts = verifier.verify_many([(f"\\boxed{{\\frac{{{n}}}{{7}}}}", f"\\frac{{{n}}}{{7}}") for n in range(8)])
    assert all(v.reason == "correct" for v in verdicts)
    assert verifier.wait_ready(30.0)


def test_many_threads_at_once_nothing_dropped(verifier: MathVerifier) -> None:
    results: dict[int, str] = {}

    def call(n: int) -> None:
        reference = f"\\frac{{{n if n % 3 else n + 1}}}{{7}}"  # fractions go through the pool
        results[n] = verifier.verify(f"\\boxed{{\\frac{{{n}}}{{7}}}}", reference).reason

    threads = [threading.Thread(target=call, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 64
    assert all(results[n] == ("correct" if n % 3 else "incorrect") for n in range(64))


def test_workers_killed_from_outside_mid_item_are_replaced_and_the_item_retried(verifier: MathVerifier) -> None:
    assert verifier.wait_ready(30.0)
    restarts = verifier.restarts
    future = verifier.submit("\\boxed{9^{9^{9^{9}}}}", "1")
    time.sleep(0.3)
    for worker in list(verifier._workers):
        assert worker is not None
        worker.process.kill()
    assert verifier.verify("\\boxed{\\frac{3}{7}}", "\\frac{3}{7}").reason == "correct"
    assert future.result(timeout=verifier.item_timeout + 10).reason == "timeout"  # retried, then hit its deadline
    assert verifier.restarts >= restarts + 3
    assert verifier.wait_ready(30.0)


@pytest.mark.parametrize(
    ("answer", "reference"),
    [("167", "167"), ("166", "167"), ("007", "7"), ("-3", "-3"), ("+5", "5"), ("0", "-0"), ("12", "\\boxed{12}")],
)
def test_integer_fast_path_agrees_with_math_verify(answer: str, reference: str) -> None:
    """The shortcut for integers must give exactly math-verify's verdict (it only skips the cost)."""
    from cadence.reward.verifier import check, integer_verdict, wrap_reference

    boxed = f"\\boxed{{{answer}}}"
    assert integer_verdict(boxed, reference) == check(boxed, wrap_reference(reference))


def test_integer_fast_path_declines_non_integers() -> None:
    from cadence.reward.verifier import integer_verdict

    assert integer_verdict("\\boxed{3.5}", "3.5") is None
    assert integer_verdict("\\boxed{12}", "\\frac{1}{2}") is None
    assert integer_verdict("the answer is 12", "12") is None


@pytest.mark.parametrize(
    "answer",
    ["\\boxed{555", "\\boxed{55", "\\boxed{1} and \\boxed{55}", "\\boxed{55} pct", "Final answer: \\boxed{55}"],
)
def test_integer_fast_path_declines_what_math_verify_would_read_otherwise(answer: str) -> None:
    """An unclosed box (`\\boxed{555` once passed as 55), several boxes, or text math-verify ranks with boxes."""
    from cadence.reward.verifier import integer_verdict

    assert integer_verdict(answer, "55") is None


def test_strict_format_scores_text_after_the_last_box_zero(verifier: MathVerifier) -> None:
    """The toy's length collapse: `\\boxed{167}6}` verifies as 167 leniently; strict, only a stop after the box."""
    from cadence.reward.verifier import runs_past_last_box

    strict = MathVerifier(processes=1, item_timeout=3.0, strict_format=True)
    try:
        assert strict.wait_ready()
        for response, lenient, strict_reason in [
            (" \\boxed{167}", "correct", "correct"),
            ("so $\\boxed{167}$.", "correct", "correct"),
            (" \\boxed{167}6}", "correct", "trailing_text"),
            (" \\boxed{167} and more", "correct", "trailing_text"),
            (" \\boxed{166}6}", "incorrect", "trailing_text"),
            ("no box", "no_answer", "no_answer"),
        ]:
            assert verifier.verify(response, "167").reason == lenient, response
            assert strict.verify(response, "167").reason == strict_reason, response
    finally:
        strict.close()
    assert runs_past_last_box(" \\boxed{1}2}") and not runs_past_last_box(" \\boxed{12}") and not runs_past_last_box("")
