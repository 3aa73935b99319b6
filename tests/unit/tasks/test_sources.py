"""NuminaMath filter, WildChat first-turn extraction and generic files, on small files written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cadence.config import TaskConfig
from cadence.errors import ConfigError
from cadence.tasks import load_problems
from cadence.tasks.sources import last_boxed

NUMINA = [
    {"source": "olympiads", "problem": "Find x if 2x = 6.", "solution": "So $x=\\boxed{3}$."},
    {
        "source": "cn_k12",
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.",
        "solution": "\\boxed{\\frac{2}{2}}",
        "answer": "1",
    },
    {"source": "synthetic_math", "problem": "Find y if y+1=2.", "solution": "\\boxed{1}"},
    {"source": "olympiads", "problem": "Find z.", "solution": "\\boxed{5}", "synthetic": True},
    {"source": "olympiads", "problem": "Prove that there are infinitely many primes.", "solution": "..."},
    {"source": "olympiads", "problem": "Show that $n^2 \\ge 0$.", "solution": "Clearly. \\boxed{}"},
    {"source": "aops_forum", "problem": "Triangle.", "solution": "\\boxed{2}", "question_type": "proof"},
    {
        "source": "amc_aime",
        "problem": "What is 1+1? $\\textbf{(A)}\\ 1 \\qquad \\textbf{(B)}\\ 2$",
        "solution": "\\boxed{2}",
    },
    {"source": "cn_k12", "problem": "Which is prime?\nA: 4\nB: 6\nC: 7", "solution": "\\boxed{C}"},
    {"source": "orca_math", "problem": "Which option?", "solution": "The answer is \\boxed{B}."},
    {"source": "gsm8k", "problem": "How many apples?", "solution": "No boxed answer here."},
]


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unterminated") is None
    assert last_boxed("no box") is None


def test_numina_filter_drops_proofs_choices_synthetic_and_unanswered(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "numina.jsonl", NUMINA)
    problems = load_problems(TaskConfig(name="n", dataset=f"numina:{path}"))
    assert [(p.prompt_id, p.reference) for p in problems] == [("numina-0", "3"), ("numina-1", "1")]
    assert problems[0].text.startswith("Find x if 2x = 6.") and "\\boxed{}" in problems[0].text


def test_numina_from_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [NUMINA[0], NUMINA[2]]
    pq.write_table(
        pa.Table.from_pylist([{k: r[k] for k in ("source", "problem", "solution")} for r in rows]),
        tmp_path / "n.parquet",
    )
    problems = load_problems(TaskConfig(name="n", dataset=f"numina:{tmp_path / 'n.parquet'}"))
    assert [p.reference for p in problems] == ["3"]


WILDCHAT = [
    {
        "conversation_hash": "h1",
        "language": "English",
        "conversation": [
            {"role": "user", "content": "  Write a haiku about rain. "},
            {"role": "assistant", "content": "Drops..."},
            {"role": "user", "content": "Another one"},
        ],
    },
    {"conversation_hash": "h2", "language": "French", "conversation": [{"role": "user", "content": "Bonjour"}]},
    {
        "conversation_hash": "h3",
        "language": "English",
        "conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    },
    {"conversation_hash": "h4", "language": "English", "conversation": [{"role": "assistant", "content": "?"}]},
]


def test_wildchat_first_user_turn_english_only(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "wildchat.jsonl", WILDCHAT)
    problems = load_problems(TaskConfig(name="w", kind="chat", dataset=f"wildchat:{path}"))
    assert [(p.prompt_id, p.text, p.kind) for p in problems] == [
        ("wildchat-h1", "Write a haiku about rain.", "chat"),
        ("wildchat-h3", "Hi there", "chat"),
    ]


def test_wildchat_all_languages() -> None:
    from cadence.tasks.sources import wildchat_problems

    assert [p.text for p in wildchat_problems(WILDCHAT, english_only=False)] == [
        "Write a haiku about rain.",
        "Bonjour",
        "Hi there",
    ]


def test_generic_jsonl_is_sniffed_per_record(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [
            {"id": "q1", "problem": "2+2?", "answer": "4"},
            {"id": "q2", "problem": "no answer"},
            {"question": "3+3?", "answer": 6},
        ],
    )
    problems = load_problems(TaskConfig(name="g", dataset=str(path)))
    assert [(p.prompt_id, p.reference) for p in problems] == [("mine-q1", "4"), ("mine-2", "6")]
    chat = load_problems(TaskConfig(name="g", kind="chat", dataset=str(path)))
    assert [p.text for p in chat] == ["2+2?", "no answer", "3+3?"]


def test_missing_file_and_unreachable_hub_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_problems(TaskConfig(name="g", dataset=str(tmp_path / "absent.jsonl")))
    with pytest.raises(ConfigError, match="local JSONL/Parquet"):
        load_problems(TaskConfig(name="g", dataset="no-such-owner-xyz/no-such-dataset"))
