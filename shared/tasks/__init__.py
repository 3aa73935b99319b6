"""Prompt sources: the toy addition task, MATH-500/AMC23 and chat prompt files, NuminaMath, WildChat,
and any JSONL/Parquet file or `datasets` name. `load_problems(task)` is the one entry point.

`task.dataset` is one of:
- `toy` (split `train` | `test`), `math500`, `amc23`, `alpaca_eval`, `arena_hard` (files in the data dir);
- `numina` / `wildchat` (their hub datasets), or `numina:<file or name>` / `wildchat:<file or name>`;
- a `.jsonl`/`.json`/`.parquet` path or another `datasets` name, read record by record.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cadence.errors import ConfigError
from cadence.tasks.benchmarks import BENCHMARKS, default_data_dir, load_benchmark
from cadence.tasks.problem import MATH_INSTRUCTION, Problem, math_prompt
from cadence.tasks.sources import (
    FILE_SUFFIXES,
    NUMINA_HUB_NAME,
    WILDCHAT_HUB_NAME,
    generic_problems,
    numina_problems,
    read_records,
    wildchat_problems,
)
from cadence.tasks.toy import load_toy, toy_prompt, toy_target

if TYPE_CHECKING:
    from cadence.config import TaskConfig

__all__ = [
    "MATH_INSTRUCTION",
    "Problem",
    "default_data_dir",
    "load_problems",
    "math_prompt",
    "toy_prompt",
    "toy_target",
]

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PREFIXED = {"numina": NUMINA_HUB_NAME, "wildchat": WILDCHAT_HUB_NAME}
CHOICES = (
    "toy",
    *BENCHMARKS,
    "numina[:<file or name>]",
    "wildchat[:<file or name>]",
    "<.jsonl/.parquet path>",
    "<owner/name on the HF hub>",
)


def load_problems(task: TaskConfig, data_dir: Path | None = None, seed: int = 0) -> list[Problem]:
    """The problems of one task, at most `task.limit`; `seed` fixes the toy train/test split."""
    problems = _dispatch(task, data_dir, seed)
    kinds = {problem.kind for problem in problems}
    if kinds and kinds != {task.kind}:
        raise ConfigError(
            f"task {task.name!r}: dataset {task.dataset!r} holds {'/'.join(sorted(kinds))} problems but the "
            f"task says kind: {task.kind}; set kind: {'/'.join(sorted(kinds))}"
        )
    if not problems:
        raise ConfigError(f"task {task.name!r}: dataset {task.dataset!r} yielded no problems; check its records")
    return problems[: task.limit] if task.limit else problems


def _dispatch(task: TaskConfig, data_dir: Path | None, seed: int) -> list[Problem]:
    dataset = task.dataset
    if dataset == "toy":
        # the toy prompts serve both paths: checked by the verifier (math) or scored by the tiny RM (chat)
        return [replace(problem, kind=task.kind) for problem in load_toy(task.split, seed)]
    if dataset in BENCHMARKS:
        return load_benchmark(dataset, data_dir)
    name, sep, source = dataset.partition(":")
    if name in _PREFIXED:
        records = read_records(source if sep else _PREFIXED[name], task.split)
        return numina_problems(records) if name == "numina" else wildchat_problems(records)
    if Path(dataset).suffix in FILE_SUFFIXES or _HUB_NAME.fullmatch(dataset):
        prefix = Path(dataset).stem if Path(dataset).suffix else dataset
        return generic_problems(read_records(dataset, task.split), task.kind, prefix)
    raise ConfigError(f"task {task.name!r}: unknown dataset {dataset!r}; use one of {', '.join(CHOICES)}")
