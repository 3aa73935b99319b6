"""`make bench`: run every benchmark, then write `bench/results/summary.md` with goal, measured and status per line.

Each benchmark is its own process (`python -m bench.<name> [--quick]`) so one that fails does not stop
the others; its failure is listed in the summary. Ratios are measured side by side inside each benchmark:
absolute times on shared machines are noise.

    .venv/bin/python -m bench.run            # everything (≤ 30 min on 2 cores)
    .venv/bin/python -m bench.run --quick    # a short pass (≤ 5 min)
    .venv/bin/python -m bench.run --only broker,reward
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench._common import RESULTS

BENCHMARKS = ("broker", "sync", "reward", "trainer", "inference", "pipeline", "paper")


def run_one(name: str, quick: bool) -> tuple[int, float]:
    args = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    started = time.monotonic()
    print(f"\n=== bench.{name} {'(quick)' if quick else ''}", flush=True)
    code = subprocess.run(args, check=False).returncode
    return code, time.monotonic() - started


def summary(outcomes: dict[str, tuple[int, float]]) -> str:
    lines = [
        "# Benchmark summary",
        "",
        "| benchmark | metric | measured | goal | unit | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, (code, seconds) in outcomes.items():
        path = RESULTS / f"{name}.json"
        if code != 0 or not path.exists():
            lines.append(f"| {name} | (failed: exit {code} after {seconds:.0f}s) | | | | error |")
            continue
        for row in json.loads(path.read_text()):
            goal = "–" if row.get("goal") is None else row["goal"]
            measured = row["measured"]
            shown = f"{measured:.3g}" if isinstance(measured, float) else measured
            lines.append(f"| {name} | {row['metric']} | {shown} | {goal} | {row.get('unit', '')} | {row['status']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short pass over every benchmark")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
    args = parser.parse_args()
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only.split(",")]
    outcomes = {name: run_one(name, args.quick) for name in chosen}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(summary(outcomes))
    print((RESULTS / "summary.md").read_text())
    sys.exit(1 if any(code for code, _ in outcomes.values()) else 0)


if __name__ == "__main__":
    main()
