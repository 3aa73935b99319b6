"""Shared by the benchmarks: print a table of results and record them in `bench/results/<name>.json`.

A row is `{"metric", "measured", "goal", "unit", "higher_is_better", "status"}`; status is `ok` or `short`
against the goal, and a goal of None means the figure is reported only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def row(metric: str, measured: float, goal: float | None, unit: str, higher_is_better: bool = True) -> dict[str, Any]:
    """One result row; status `ok` when the goal is met (or there is none), else `short`."""
    met = goal is None or (measured >= goal if higher_is_better else measured <= goal)
    return {
        "metric": metric,
        "measured": round(measured, 3),
        "goal": goal,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "status": "ok" if met else "short",
    }


def record(name: str, rows: list[dict[str, Any]]) -> Path:
    """Write the rows to `bench/results/<name>.json` (so results compare across runs) and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows as an aligned text table."""
    header = ["metric", "measured", "goal", "unit", "status"]
    cells = [[_fmt(row.get(key)) for key in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
