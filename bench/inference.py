"""Inference benchmark: vLLM vs the HF engine, side by side, and weight-update latency.

What it measures, in one run on this machine:
1. generation throughput (generated tokens per second of wall time) of `VllmEngine` and `HFEngine` on the
   same model and the same prompts, at batch 1, 8 and 32 prompts per call (n = 1, temperature 1, seed 0):
   SmolLM2-135M-Instruct (chat prompts, 32 new tokens; goal: vLLM ≥ 5× HF) and the tiny seed model (toy
   prompts, 14 new tokens; too small to separate the engines, reported only);
2. weight-update latency, as the worker does it: `BrokerClient.fetch` of a published version from a broker
   on loopback (sha256-verified) + `engine.load_weights` into the running engine, for both models.

Simplifications: both engines in fp32 (Cadence's CPU default; vLLM would otherwise downcast to bf16), both
on all cores, one warm-up call per configuration, then max(1, 4 / batch) timed calls with different seeds
(sampled answers end at EOS at different lengths; totals over several calls even that out).
The weights published are the model's own, so the update changes nothing but costs the full transfer.

Run: `.venv/bin/python bench/inference.py [--models smollm2,tiny]` (several minutes; never in CI).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, record, row

BATCHES = (1, 8, 32)
CHAT = [
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the capital of France, and why is it famous?",
    "Describe a sunset to someone who has never seen one.",
    "List some healthy breakfast ideas.",
    "How do airplanes stay in the air?",
    "Tell me a fun fact about octopuses.",
]


def prompts(model: str, count: int) -> list[Any]:
    if model == "tiny":
        return [f"What is {i}+{2 * i + 1}?" for i in range(count)]
    return [[{"role": "user", "content": CHAT[i % len(CHAT)] + f" ({i})"}] for i in range(count)]


def throughput(engine: Any, model: str, batch: int, max_tokens: int) -> float:
    """Generated tokens per second over `max(1, 4 // batch)` timed calls (seeds 1, 2, ...), after a warm-up.

    Several calls average out how early sampled answers hit EOS, which dominates a single small batch.
    """
    from cadence.inference.engine import SamplingParams

    batch_prompts = prompts(model, batch)
    engine.generate(batch_prompts, SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=0))  # warm-up
    tokens, seconds = 0, 0.0
    for seed in range(1, max(1, 4 // batch) + 1):
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed)
        started = time.perf_counter()
        generation = engine.generate(batch_prompts, params)
        seconds += time.perf_counter() - started
        tokens += sum(len(s.token_ids) for c in generation.completions for s in c.samples)
    return tokens / seconds


def update_latency(engine: Any, broker: str, run_id: str, version: int) -> tuple[float, float]:
    """Seconds to fetch `version` from the broker and to load it into `engine`."""
    from cadence.clients import BrokerClient

    with BrokerClient(broker, run_id) as client:
        started = time.perf_counter()
        tensors = client.fetch(version)
        fetched = time.perf_counter()
    engine.load_weights(tensors.items(), version)
    return fetched - started, time.perf_counter() - fetched


def _best_rate(engine: Any, kind: str, model: str, batch: int, max_tokens: int, rows: list) -> float:
    """tokens/s; transformers is timed with 1 and 2 torch threads and keeps the faster (a fair baseline).

    Measured here: on the tiny model, 2 threads make HF generate ~14x slower than 1 (thread overhead on
    small matrices), which would flatter vLLM if the default were kept.
    """
    import torch

    if kind != "hf":
        rate = throughput(engine, model, batch, max_tokens)
        rows.append(row(f"{model} {kind} tokens/s batch {batch}", rate, None, "tok/s"))
        return rate
    default = torch.get_num_threads()
    per_threads = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            per_threads[threads] = throughput(engine, model, batch, max_tokens)
            rows.append(
                row(f"{model} hf tokens/s batch {batch} ({threads} thread)", per_threads[threads], None, "tok/s")
            )
    finally:
        torch.set_num_threads(default)
    print(rows[-2:], flush=True)
    return max(per_threads.values())


def bench_model(model: str, model_dir: Path, broker: str) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    from cadence.clients import BrokerClient
    from cadence.inference.hf_engine import HFEngine
    from cadence.inference.vllm_engine import VllmEngine

    max_tokens = 14 if model == "tiny" else 32
    run_id = f"bench-{model}"
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    with BrokerClient(broker, run_id) as client:
        client.publish(weights, 1)
    rows, rates = [], {}
    for kind, factory in (("hf", lambda: HFEngine(model_dir)), ("vllm", lambda: VllmEngine(model_dir))):
        started = time.perf_counter()
        engine = factory()
        print(f"{model}/{kind}: engine up in {time.perf_counter() - started:.1f}s", flush=True)
        try:
            for batch in BATCHES:
                rates[kind, batch] = _best_rate(engine, kind, model, batch, max_tokens, rows)
            fetch_s, load_s = update_latency(engine, broker, run_id, 1)
            rows.append(row(f"{model} {kind} weight update fetch", fetch_s, None, "s", higher_is_better=False))
            rows.append(row(f"{model} {kind} weight update load", load_s, None, "s", higher_is_better=False))
            rows.append(row(f"{model} {kind} weight update total", fetch_s + load_s, None, "s", False))
        finally:
            engine.close()
    goal = 5.0 if model == "smollm2" else None
    for batch in BATCHES:
        speedup = rates["vllm", batch] / rates["hf", batch]
        rows.append(row(f"{model} vllm/hf speed-up batch {batch}", speedup, goal, "x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args()
    if args.quick:
        args.models = "tiny"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch

    from cadence.broker.main import build
    from cadence.broker.settings import BrokerSettings
    from cadence.models.seed import build_tiny
    from cadence.models.smollm2 import build_smollm2
    from cadence.net import free_port

    torch.set_num_threads(os.cpu_count() or 1)
    server, servicer = build(BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory"))
    broker = f"127.0.0.1:{server.start()}"
    builders = {"smollm2": build_smollm2, "tiny": build_tiny}
    rows: list[dict[str, Any]] = []
    try:
        for model in args.models.split(","):
            rows += bench_model(model, Path(builders[model]()), broker)
    finally:
        servicer.close()
        server.stop(0)
    print_table(rows)
    print(f"recorded in {record('inference', rows)}")


if __name__ == "__main__":
    main()
