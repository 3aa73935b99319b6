"""MATH-500 and AMC23 read from the shared data directory (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadence.config import TaskConfig
from cadence.errors import ConfigError
from cadence.tasks import MATH_INSTRUCTION, load_problems
from cadence.tasks.benchmarks import checkout_data_dir, default_data_dir


def test_default_data_dir_is_beside_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CADENCE_DATA_DIR", raising=False)
    assert default_data_dir() == checkout_data_dir()
    assert checkout_data_dir().parts[-2:] == ("shared", "data")


@pytest.mark.needs_data("math500")
def test_the_checkout_data_dir_holds_math500() -> None:
    assert (default_data_dir() / "math500.jsonl").is_file()


@pytest.mark.needs_data("math500")
def test_math500_has_500_problems_with_references() -> None:
    problems = load_problems(TaskConfig(name="m", dataset="math500"))
    assert len(problems) == 500
    assert len({p.prompt_id for p in problems}) == 500
    assert all(p.reference and p.text.endswith(MATH_INSTRUCTION) for p in problems)
    first = problems[0]
    assert first.prompt_id == "math500-test/precalculus/807.json"
    assert first.reference == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.text.startswith("Convert the point $(0,3)$")


@pytest.mark.needs_data("amc23")
def test_amc23_has_40_problems_with_string_answers() -> None:
    problems = load_problems(TaskConfig(name="a", dataset="amc23"))
    assert len(problems) == 40
    assert problems[0].reference == "27"
    assert all("\\boxed{}" in p.text for p in problems)


@pytest.mark.needs_data("arena_hard")
def test_chat_prompt_files_are_chat_tasks() -> None:
    problems = load_problems(TaskConfig(name="c", kind="chat", dataset="arena_hard", limit=5))
    assert len(problems) == 5 and all(p.kind == "chat" and p.reference is None for p in problems)


@pytest.mark.needs_data("math500")
def test_kind_mismatch_says_which_kind_to_use() -> None:
    with pytest.raises(ConfigError, match="set kind: math"):
        load_problems(TaskConfig(name="m", kind="chat", dataset="math500"))


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CADENCE_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="CADENCE_DATA_DIR"):
        load_problems(TaskConfig(name="m", dataset="math500"))
    (tmp_path / "amc23.jsonl").write_text('{"id": 7, "problem": "1+1?", "answer": 2.0, "answer_str": "2"}\n')
    [problem] = load_problems(TaskConfig(name="a", dataset="amc23"))
    assert (problem.prompt_id, problem.reference) == ("amc23-7", "2")


def test_unknown_dataset_names_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match="toy, math500, amc23"):
        load_problems(TaskConfig(name="x", dataset="math-500"))


def test_without_any_data_folder_the_public_dataset_is_tried_and_the_error_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A clone with no ../shared: the loader falls back to the hub id and, offline, names both remedies."""
    import cadence.tasks.benchmarks as benchmarks

    monkeypatch.delenv("CADENCE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(benchmarks, "checkout_data_dir", lambda: tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"HuggingFaceH4/MATH-500.*set CADENCE_DATA_DIR"):
        load_problems(TaskConfig(name="m", dataset="math500"))
