"""Evaluation sets (never copied into the repo): MATH-500, AMC23, and the AlpacaEval / Arena-Hard prompt
lists for chat.

Where a set is read from, first match wins: an explicit `data_dir`, `CADENCE_DATA_DIR`, `../shared/data`
beside the checkout (the project's CI), and last the set's public dataset id through `datasets` (needs
network access to the Hugging Face Hub)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cadence.errors import ConfigError
from cadence.tasks.problem import Kind, Problem
from cadence.tasks.sources import generic_problems, read_records


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: its file in a data directory and the public dataset it comes from."""

    file_name: str
    kind: Kind
    hub_id: str
    hub_split: str


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math500.jsonl", "math", "HuggingFaceH4/MATH-500", "test"),
    "amc23": Benchmark("amc23.jsonl", "math", "math-ai/amc23", "test"),
    "alpaca_eval": Benchmark("alpaca_eval_prompts.jsonl", "chat", "tatsu-lab/alpaca_eval", "eval"),
    "arena_hard": Benchmark("arena_hard_prompts.jsonl", "chat", "lmarena-ai/arena-hard-auto-v0.1", "train"),
}


def checkout_data_dir() -> Path:
    """`../shared/data` beside the checkout: where the project's CI keeps the evaluation files."""
    import cadence

    return Path(cadence.__file__).resolve().parent.parent.parent / "shared" / "data"


def configured_data_dir() -> Path | None:
    """`CADENCE_DATA_DIR`, or None when unset."""
    from cadence.settings import CommonSettings

    return CommonSettings().data_dir


def default_data_dir() -> Path:
    """`CADENCE_DATA_DIR` when set, else `../shared/data` beside the checkout."""
    return configured_data_dir() or checkout_data_dir()


def benchmark_file(name: str, data_dir: Path | None = None) -> Path | None:
    """The benchmark's local file, or None when no data directory holds it."""
    path = (data_dir or default_data_dir()) / BENCHMARKS[name].file_name
    return path if path.is_file() else None


def benchmark_available(name: str, data_dir: Path | None = None) -> bool:
    """Whether the benchmark can be read without the network (tests skip on False)."""
    return benchmark_file(name, data_dir) is not None


def load_benchmark(name: str, data_dir: Path | None = None) -> list[Problem]:
    """MATH-500 (500 problems), AMC23 (40), AlpacaEval (805) or Arena-Hard (500) prompts."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[name]
    path = benchmark_file(name, data_dir)
    if path is not None:
        return generic_problems(read_records(path), benchmark.kind, prefix=name)
    explicit = data_dir or configured_data_dir()
    if explicit is not None:  # a folder the user named that lacks the file is a mistake, not a cue to go online
        raise ConfigError(
            f"{name}: {explicit / benchmark.file_name} does not exist; put {benchmark.file_name} there or point "
            f"CADENCE_DATA_DIR (or data_dir=...) at the folder holding it"
        )
    try:
        records = read_records(benchmark.hub_id, split=benchmark.hub_split)
    except ConfigError as error:
        raise ConfigError(
            f"{name}: no {benchmark.file_name} in {checkout_data_dir()} and the public dataset "
            f"{benchmark.hub_id!r} could not be loaded ({error}); set CADENCE_DATA_DIR to the folder holding "
            f"{benchmark.file_name}, or allow access to the Hugging Face Hub"
        ) from None
    return generic_problems(records, benchmark.kind, prefix=name)
