"""Shared by `bench.pipeline` and `bench.paper`: run `cadence run` on a toy config and read what it wrote.

Each run is a real local run (redis-server, broker, reward, inference and trainer processes) in its own
folder under `bench/results/runs/`; its console output goes to `<folder>.log`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import RESULTS

ROOT = Path(__file__).resolve().parent.parent
RUNS = RESULTS / "runs"


@dataclass
class Run:
    """A finished run: its folder, metrics rows, evaluations and wall-clock of the whole command."""

    name: str
    folder: Path
    metrics: list[dict[str, Any]]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    seconds: float

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.metrics if row.get(key) is not None]


def cadence_run(name: str, config: str, overrides: list[str], timeout: float = 3600.0) -> Run:
    """`cadence run configs/<config>.yaml --set ...` as run `name`; raises when it fails. The timeout is for a
    hung run: a 200-step toy run on 2 cores shared with other jobs took over 15 minutes."""
    RUNS.mkdir(parents=True, exist_ok=True)
    run_id = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    args = [sys.executable, "-m", "cadence.app.cli", "run", str(ROOT / "configs" / f"{config}.yaml")]
    args += ["--runs-dir", str(RUNS), "--engine", "hf", "--set", f"run_id={run_id}"]
    for override in overrides:
        args += ["--set", override]
    log = RUNS / f"{run_id}.log"
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
    seconds = time.monotonic() - started
    folders = sorted(RUNS.glob(f"{run_id}-*/"))  # the launcher stamps the id: <run_id>-<date>-<time>
    if code != 0 or not folders or not (folders[-1] / "metrics.jsonl").is_file():
        raise RuntimeError(f"run {name} failed (exit {code}); see {log}")
    return load_run(name, folders[-1], seconds)


def load_run(name: str, folder: Path, seconds: float = float("nan")) -> Run:
    """A finished run read back from its folder."""
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    return Run(name, folder, metrics, _json(folder / "eval_before.json"), _json(folder / "eval_after.json"), seconds)


def run_many(
    jobs: list[tuple[str, str, list[str]]], parallel: int = 1, done: Callable[[int, Run], None] | None = None
) -> list[Run]:
    """`cadence_run(name, config, overrides)` for each job, `parallel` at a time, results in job order;
    `done(index, run)` as each one finishes (so a long grid records its progress). Concurrent runs slow each
    other alike, so interleave the regimes being compared in `jobs`."""
    from concurrent.futures import ThreadPoolExecutor

    def one(indexed: tuple[int, tuple[str, str, list[str]]]) -> Run:
        index, job = indexed
        print(f"-- [{index + 1}/{len(jobs)}] {job[0]} {' '.join(job[2])}", flush=True)
        run = cadence_run(*job)
        if done is not None:
            done(index, run)
        return run

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, enumerate(jobs)))


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    if len(values) < 2:
        return mean(values), 0.0
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
