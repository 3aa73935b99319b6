"""Reward service benchmark: HTTP batch scoring against math-verify called in-process, and the RM path.

What it measures, side by side in one run on the same items (MATH-500: each gold solution, a short boxed
gold answer, another problem's answer, and an answer-free text — 2,000 items, 400 with --quick):
1. in-process: bounded extraction + math-verify `parse`/`verify` in this process's main thread, one item at
   a time — the ceiling the service is compared to;
2. HTTP: `cadence serve reward` as its own process with 1 and then 2 math-verify pool processes, items
   POSTed to `/v1/score` in batches of 64 over one keep-alive connection: items/s and the overhead
   ratio in-process ÷ HTTP items/s (goal ≤ 1.3× with 1 pool process, like for like);
3. latency p50/p99 of single requests at batch 1 and batch 64, for 1 and 2 pool processes;
4. the reward model (`tiny-rm`): items/s of `chat` scoring over HTTP and of `RewardModel.score` in-process
   (chat template, tokenising, token-budget batching) against a bare forward pass of the same model on
   pre-tokenised batches of the same inputs (in-process figures: best of 3). `tiny-rm` when it is built
   under CADENCE_HOME, else a random-init model of the same shape (same speed).

Simplifications: one host (2 shared cores here, so absolute figures are noisy; ratios are what to read),
one client, torch at one thread on both sides.

Run: `.venv/bin/python -m bench.reward [--quick]` (≈ 2–4 min; not run in CI). Writes bench/results/reward.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _common import print_table, record, row

from cadence.net import free_port
from cadence.reward.verifier import check, extract_answer, wrap_reference

BATCH = 64


def math_items(count: int) -> list[dict[str, str]]:
    """MATH-500's gold solutions, boxed answers, wrong answers and junk (from the data folder or its hub id)."""
    from cadence.tasks.benchmarks import BENCHMARKS, benchmark_file
    from cadence.tasks.sources import read_records

    path = benchmark_file("math500")
    rows = read_records(path if path else BENCHMARKS["math500"].hub_id, split=BENCHMARKS["math500"].hub_split)
    items = []
    for index, r in enumerate(rows):
        other = rows[(index + len(rows) // 2) % len(rows)]["answer"]
        for response in (r["solution"], f"The answer is $\\boxed{{{r['answer']}}}$.", f"So \\boxed{{{other}}}.", "?"):
            items.append({"prompt": r["problem"], "response": response, "reference": r["answer"], "task": "math"})
    return items[:count]


def in_process(items: list[dict[str, str]]) -> float:
    """Items/s of extraction + parse + verify in this thread (math-verify's own timeouts off, as in the pool)."""
    started = time.perf_counter()
    for item in items:
        answer = extract_answer(item["response"])
        if answer is not None:
            check(answer, wrap_reference(item["reference"]))
    return len(items) / (time.perf_counter() - started)


def start_service(processes: int, reward_model: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CADENCE_POOL_PROCESSES": str(processes),
        "OMP_NUM_THREADS": "1",
        "CADENCE_LOG_LEVEL": "WARNING",
    }
    args = ["serve", "reward", "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port())]
    args += ["--no-worker", *(["--reward-model", reward_model] if reward_model else [])]
    proc = subprocess.Popen([sys.executable, "-m", "cadence.app.cli", *args], env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("cadence serve reward did not become ready")


def http_rate(client: httpx.Client, items: list[dict[str, str]], batch: int) -> tuple[float, list[float]]:
    """Items/s over all items in batches of `batch`, and each request's latency in seconds."""
    latencies = []
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        sent = time.perf_counter()
        reply = client.post("/v1/score", json={"items": items[start : start + batch]})
        reply.raise_for_status()
        latencies.append(time.perf_counter() - sent)
    return len(items) / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def math_rows(items: list[dict[str, str]], baseline: float) -> list[dict[str, Any]]:
    rows = []
    for processes in (1, 2):
        proc, base = start_service(processes)
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                http_rate(client, items[:BATCH], BATCH)  # warm-up
                rate, lat64 = http_rate(client, items, BATCH)
                _, lat1 = http_rate(client, items[: min(len(items), 500)], 1)
        finally:
            proc.terminate()
            proc.wait(30)
        tag = f"{processes} pool proc"
        rows.append(row(f"HTTP batch-64 items/s ({tag})", rate, None, "items/s"))
        goal = 1.3 if processes == 1 else None
        rows.append(row(f"overhead in-process ÷ HTTP ({tag})", baseline / rate, goal, "x", higher_is_better=False))
        for name, lat in (("batch 1", lat1), ("batch 64", lat64)):
            rows.append(row(f"p50 latency {name} ({tag})", 1000 * statistics.median(lat), None, "ms", False))
            rows.append(row(f"p99 latency {name} ({tag})", 1000 * percentile(lat, 0.99), None, "ms", False))
    return rows


def chat_items(count: int) -> list[dict[str, str]]:
    items = []
    for n in range(count):
        a, b = n % 97, (n * 7) % 89
        response = f" \\boxed{{{a + b + (n % 3 == 0)}}}" if n % 2 else f" so it is \\boxed{{{a + b}}}"
        items.append({"prompt": f"What is {a}+{b}?", "response": response, "task": "chat"})
    return items


def best_of(repeats: int, call: Callable[[], object]) -> float:
    """The shortest of `repeats` timed calls, in seconds (the least disturbed by other work on the host)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def rm_model_dir(tmp: Path) -> tuple[Path, str]:
    """`tiny-rm` when it is built already, else a random-init model of the same shape (same speed)."""
    from cadence.models.cache import MARKER
    from cadence.paths import models_dir

    built = models_dir() / "tiny-rm-seed0"
    if (built / MARKER).is_file():
        return built, "tiny-rm"
    from cadence.models.tiny import save_untrained_rm

    save_untrained_rm(tmp)
    return tmp, "tiny-rm shape, random init"


def rm_rows(count: int) -> list[dict[str, Any]]:
    import tempfile

    import torch

    from cadence.reward.reward_model import RewardModel

    torch.set_num_threads(1)
    model_dir, label = rm_model_dir(Path(tempfile.mkdtemp(prefix="bench-rm-")))
    items = chat_items(count)
    rm = RewardModel(str(model_dir), device="cpu")
    pairs = [(item["prompt"], item["response"]) for item in items]
    rm.score(pairs[:BATCH])
    ids = rm.encode(pairs)
    groups = [
        rm.tokenizer.pad({"input_ids": [ids[i] for i in g]}, return_tensors="pt")
        for g in rm.batches([len(s) for s in ids])
    ]

    def bare_forward() -> None:
        with torch.inference_mode():
            for batch in groups:
                rm.model(**batch)

    scored = count / best_of(3, lambda: rm.score(pairs))
    bare = count / best_of(3, bare_forward)
    proc, base = start_service(1, str(model_dir))
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            http_rate(client, items[:BATCH], BATCH)
            over_http, _ = http_rate(client, items, BATCH)
    finally:
        proc.terminate()
        proc.wait(30)
    return [
        row(f"RM bare forward items/s ({label})", bare, None, "items/s"),
        row("RM RewardModel.score items/s", scored, None, "items/s"),
        row("RM HTTP batch-64 items/s", over_http, None, "items/s"),
        row("RM overhead bare ÷ HTTP", bare / over_http, None, "x", higher_is_better=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 items instead of 2,000")
    args = parser.parse_args()
    count = 400 if args.quick else 2000
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeouts are off" notice: the pool enforces them
    items = math_items(count)
    in_process(items[:BATCH])  # warm-up: regex compilation, lazy imports
    baseline = in_process(items)
    rows = [row("in-process math-verify items/s (1 thread)", baseline, None, "items/s")]
    rows += math_rows(items, baseline)
    rows += rm_rows(count)
    print_table(rows)
    print(f"wrote {record('reward', rows)}")


if __name__ == "__main__":
    main()
