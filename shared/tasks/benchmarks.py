"""Evaluation sets read from the data directory (never copied into the repo): MATH-500, AMC23,
and the AlpacaEval / Arena-Hard prompt lists for chat."""

from __future__ import annotations

from pathlib import Path

from cadence.errors import ConfigError
from cadence.tasks.problem import Kind, Problem
from cadence.tasks.sources import generic_problems, read_records

# name → (file in the data directory, kind of problem it holds)
BENCHMARKS: dict[str, tuple[str, Kind]] = {
    "math500": ("math500.jsonl", "math"),
    "amc23": ("amc23.jsonl", "math"),
    "alpaca_eval": ("alpaca_eval_prompts.jsonl", "chat"),
    "arena_hard": ("arena_hard_prompts.jsonl", "chat"),
}


def default_data_dir() -> Path:
    """`CADENCE_DATA_DIR` when set, else `../shared/data` beside the checkout."""
    import cadence
    from cadence.settings import CommonSettings

    configured = CommonSettings().data_dir
    if configured is not None:
        return configured
    return Path(cadence.__file__).resolve().parent.parent.parent / "shared" / "data"


def benchmark_path(name: str, data_dir: Path | None = None) -> Path:
    """Where a benchmark's file is; raises `ConfigError` saying how to point at it when missing."""
    file_name, _ = BENCHMARKS[name]
    path = (data_dir or default_data_dir()) / file_name
    if not path.is_file():
        raise ConfigError(
            f"{name}: {path} does not exist; set CADENCE_DATA_DIR to the folder holding {file_name} "
            f"(or pass data_dir=...)"
        )
    return path


def load_benchmark(name: str, data_dir: Path | None = None) -> list[Problem]:
    """MATH-500 (500 problems), AMC23 (40), AlpacaEval (805) or Arena-Hard (500) prompts."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    _, kind = BENCHMARKS[name]
    return generic_problems(read_records(benchmark_path(name, data_dir)), kind, prefix=name)
