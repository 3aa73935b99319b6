"""Weight-sync bytes per version: how small a delta version is, and what encoding and decoding it cost.

What it measures, in one run: SmolLM2-135M (built locally by `cadence seed-model smollm2`) trained with real
AdamW steps (the trainer's optimizer settings: betas 0.9/0.999, gradient clipping 0.1, fp32 master weights,
and ε 1e-8 as for chat tasks: math's 1e-4 takes smaller steps, so fewer bf16 values change) on plain NLL of a
few fixed sequences, at the paper's lr 1e-6 and the toy's lr 5e-4. After every step the weights are packed
as the trainer publishes them on GPU (bf16, `cadence.weights.pack`), and
1. for s = 1 (consecutive steps) and s = 10 (ten steps apart), the delta's size ÷ the full payload, for the
   encoding Cadence uses (`cadence.weights_delta`: XOR against the previous version + zstd level 1) and the
   candidates it was chosen against: sparse indices + values (raw and zstd'd), XOR + zstd level 3, XOR + lz4,
   XOR + zlib level 1; each with its encode and decode time (two threads);
2. the same at lr 1e-6, s = 1 with the weights sent in fp32 (the CPU trainer's dtype), to show why the wire
   dtype matters;
3. the transfer time the delta saves at 25 Gbit/s (the issue's cluster link) and at this broker's loopback
   rate (a real `cadence serve broker` and `BrokerClient`: full fetch vs delta fetch of the same version,
   decode and end-to-end sha256 verification included), against encode + decode time;
4. fan-out, full versions vs relay (`cadence.clients.relay`): 1, 2 and 4 fetcher processes (like inference
   pods) fetch one SmolLM2-135M-shaped bf16 version (random values, 270 MB) at once; the broker's egress
   (its `Status.bytes_out`) ÷ one version, and the time from their common start until every one holds the
   whole version verified (goals at 4 fetchers: egress ≤ 1.2 × one version, time ≤ 1.5 × one fetcher's);
   the CPU seconds each fetcher spends on its own fetch (receive, verify, assemble: process CPU, every
   thread) and what the whole fan-out took (fetchers, relaying included, and the broker), whose share of
   this machine's cores is a floor no overlap can beat: `CPU floor for 4 ÷ time for 1` above 1.5 means the
   time goal cannot be met on these cores, however the bytes are routed. Measured 2026-12-02 04:22 (load 2-3):
   one fetcher takes 0.52 s and 0.63 CPU s (relay route; 0.59 s and 0.77 CPU s from the broker), so 4 need at
   least 4 × 0.63 ÷ 2 cores = 1.26 s = 2.4× one fetcher's time before any contention (2.6× from the broker);
   again at 04:54 (load 1.6-2.8): 0.70 CPU s in 0.525 s, 2.7×; 4 fetchers through relays took 3.61 s.

s = 1 figures are the mean over the ten consecutive pairs (Adam's first step moves every weight by the full
lr, later ones by less); the candidates are compared on the last pair. MB = 10^6 bytes.

Run: `.venv/bin/python -m bench.sync [--quick | --fan-out-only]` (not run in CI; `--fan-out-only`: only 4.,
about 2 minutes). On the 2-core sandbox shared with other jobs
(load 15-40) `--quick` took 20 minutes and the full run did not finish in 50; the optimizer steps dominate.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import zstandard
from _common import print_table, record, row
from broker import smollm2_state, start_broker

from cadence import weights_delta
from cadence.clients import BrokerClient
from cadence.clients.relay import start_relay
from cadence.config import OptimizerConfig
from cadence.weights import Packed, pack

GOAL_PERCENT = 10.0  # ≤ 10 % of full at lr 1e-6 bf16 s=1
GOAL_EGRESS = 1.2  # × one version, at 4 fetchers, with relay
GOAL_FAN_OUT_TIME = 1.5  # time until 4 fetchers hold the version ÷ the time for one
FETCHERS = (1, 2, 4)
LINK_BYTES_PER_S = 25e9 / 8
EPS = 1e-8  # the trainer's ε for chat tasks (math's 1e-4 takes smaller steps): the larger deltas
TEXTS = [
    "Question: what is 17 + 25? Think step by step. 17 + 25 = 42, so the answer is \\boxed{42}.",
    "Question: what is 9 * 8? Nine eights are seventy-two, so the answer is \\boxed{72}.",
    "User: Write one sentence about the sea. Assistant: The sea keeps the light of the morning in its waves.",
    "User: Name a prime number above 50. Assistant: 53 is prime; it has no divisor but 1 and itself.",
]


def train_versions(lr: float, steps: int, dtype: torch.dtype) -> Iterator[Packed]:
    """The packed weights before training, then after each of `steps` AdamW steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadence.models.smollm2 import build_smollm2

    directory = build_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = OptimizerConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=opt.betas, eps=EPS, weight_decay=opt.weight_decay)
    yield _packed(model, 0, dtype)
    for step in range(1, steps + 1):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"lr {lr:g} {dtype}: step {step}/{steps}", file=sys.stderr, flush=True)
        yield _packed(model, step, dtype)


def _packed(model: torch.nn.Module, version: int, dtype: torch.dtype) -> Packed:
    state = {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}
    return pack(state, run_id="bench", version=version)


# -- candidate encodings: (encode, decode) on two payloads of one layout ----------------------------------


def _xor(a: Any, b: Any) -> np.ndarray:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))


def _sparse(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Positions (as gaps, u32) and new values of the 16-bit words that changed."""
    old, new = np.frombuffer(a, np.uint16), np.frombuffer(b, np.uint16)
    where = np.flatnonzero(old != new)
    return np.diff(where, prepend=0).astype(np.uint32), new[where]


def _unsparse(base: Any, gaps: np.ndarray, values: np.ndarray) -> None:
    np.frombuffer(base, np.uint16)[np.cumsum(gaps, dtype=np.int64)] = values


def _sparse_raw(a: Any, b: Any) -> bytes:
    gaps, values = _sparse(a, b)
    return len(gaps).to_bytes(8, "little") + gaps.tobytes() + values.tobytes()


def _sparse_raw_apply(base: Any, data: bytes) -> None:
    n = int.from_bytes(data[:8], "little")
    _unsparse(base, np.frombuffer(data, np.uint32, n, 8), np.frombuffer(data, np.uint16, n, 8 + 4 * n))


def _xor_codec(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes]) -> tuple[Callable, Callable]:
    def encode(a: Any, b: Any) -> bytes:
        return compress(_xor(a, b).data)

    def apply(base: Any, data: bytes) -> None:
        target = np.frombuffer(base, np.uint8)
        np.bitwise_xor(target, np.frombuffer(decompress(data), np.uint8), out=target)

    return encode, apply


CANDIDATES: dict[str, tuple[Callable, Callable]] = {
    "xor+zstd1 (used)": (weights_delta.encode, weights_delta.apply),
    "xor+zstd3": (lambda a, b: weights_delta.encode(a, b, level=3), weights_delta.apply),
    "xor+zlib1": _xor_codec(lambda d: zlib.compress(d, 1), zlib.decompress),
    "sparse idx+val": (_sparse_raw, _sparse_raw_apply),
    "sparse+zstd1": (
        lambda a, b: zstandard.ZstdCompressor(level=1).compress(_sparse_raw(a, b)),
        lambda base, d: _sparse_raw_apply(base, zstandard.ZstdDecompressor().decompress(d)),
    ),
}

try:  # lz4 is a candidate only, not a dependency
    import lz4.frame

    CANDIDATES["xor+lz4"] = _xor_codec(lz4.frame.compress, lz4.frame.decompress)
except ImportError:
    pass


def measure(name: str, base: Packed, target: Packed) -> dict[str, float]:
    """Size ratio and encode/decode seconds of one candidate; the decode is checked bit for bit."""
    encode, apply = CANDIDATES[name]
    started = time.perf_counter()
    data = encode(base.payload, target.payload)
    encoded = time.perf_counter()
    rebuilt = bytearray(base.payload)
    decoding = time.perf_counter()
    apply(rebuilt, data)
    decoded = time.perf_counter()
    assert rebuilt == target.payload, f"{name} did not rebuild the target"
    return {
        "percent": 100 * len(data) / len(target.payload),
        "changed": 100 * weights_delta.changed_share(base.payload, target.payload, every=1),
        "encode_s": encoded - started,
        "decode_s": decoded - decoding,
    }


def lr_rows(lr: float, steps: int, label: str, target: str | None = None) -> list[dict[str, Any]]:
    """Rows for one learning rate: the used encoding at s = 1 (mean) and s = `steps`, candidates on the last
    pair, and (given a broker `target`) that pair published and fetched through the broker."""
    rows, used, tag = [], "xor+zstd1 (used)", f"lr {lr:g} {label}"
    versions = train_versions(lr, steps, torch.bfloat16 if label == "bf16" else torch.float32)
    first = newest = next(versions)
    s1, pair = [], (first, first)
    for packed in versions:  # only the first and the newest pair stay in memory
        s1.append(measure(used, newest, packed))
        pair, newest = (newest, packed), packed
    s1_percent = statistics.fmean(m["percent"] for m in s1)
    rows.append(row(f"{tag}: full version (SmolLM2-135M)", len(newest.payload) / 1e6, None, "MB"))
    goal = GOAL_PERCENT if lr == 1e-6 and label == "bf16" else None
    rows.append(row(f"{tag} s=1: delta ÷ full (mean of {len(s1)})", s1_percent, goal, "%", False))
    rows.append(row(f"{tag} s=1: delta ÷ full (worst)", max(m["percent"] for m in s1), None, "%", False))
    rows.append(row(f"{tag} s=1: bytes changed (mean)", statistics.fmean(m["changed"] for m in s1), None, "%", False))
    for key in ("encode_s", "decode_s"):
        rows.append(row(f"{tag} s=1: {key.split('_')[0]}", statistics.fmean(m[key] for m in s1), None, "s"))
    saved = len(newest.payload) * (1 - s1_percent / 100) / LINK_BYTES_PER_S
    rows.append(row(f"{tag} s=1: transfer saved at 25 Gbit/s", saved, None, "s"))
    if label != "bf16":
        return rows
    far = measure(used, first, newest)
    del first
    rows.append(row(f"{tag} s={steps}: delta ÷ full", far["percent"], None, "%", False))
    rows.append(row(f"{tag} s={steps}: bytes changed", far["changed"], None, "%", False))
    for key in ("encode_s", "decode_s"):
        rows.append(row(f"{tag} s={steps}: {key.split('_')[0]}", far[key], None, "s"))
    for name in CANDIDATES:
        m = measure(name, *pair)
        rows.append(row(f"{tag} s=1 candidate {name}: size", m["percent"], None, "%", False))
        rows.append(row(f"{tag} s=1 candidate {name}: enc+dec", m["encode_s"] + m["decode_s"], None, "s"))
    return rows + (broker_rows(tag, *pair, target) if target else [])


def broker_rows(tag: str, base: Packed, newest: Packed, target: str) -> list[dict[str, Any]]:
    """Publish `base` (keyframe) then `newest` (a delta where the client finds it pays) through a real broker;
    fetch `newest` in full and, if it went as a delta, onto `base` (decode and end-to-end sha256 included)."""
    run = f"sync-{tag.replace(' ', '-')}"
    with BrokerClient(target, run) as trainer:
        started = time.perf_counter()
        trainer.publish_packed(_renumbered(base, run, 1))
        keyframe = time.perf_counter()
        info = trainer.publish_packed(_renumbered(newest, run, 2))
        published = time.perf_counter()
    how = "as delta, encode included" if info.delta_bytes else "in full: the client found no delta would pay"
    rows = [
        row(f"{tag} s=1 broker: publish in full", keyframe - started, None, "s", False),
        row(f"{tag} s=1 broker: publish next ({how})", published - keyframe, None, "s", False),
    ]
    with BrokerClient(target, run) as late:
        started_full = time.perf_counter()
        late.fetch(2)
        full_s = time.perf_counter() - started_full
    rows.append(row(f"{tag} s=1 broker: fetch in full", full_s, None, "s", False))
    if not info.delta_bytes:
        return rows
    with BrokerClient(target, run, apply_deltas=True) as replica:
        replica.fetch(1)
        started_delta = time.perf_counter()
        replica.fetch(2)
        delta_s = time.perf_counter() - started_delta
    return [
        *rows,
        row(f"{tag} s=1 broker: fetch as delta (decode + sha256 included)", delta_s, None, "s", False),
        row(f"{tag} s=1 broker: fetch speed-up", full_s / delta_s, None, "×"),
    ]


def _renumbered(packed: Packed, run: str, version: int) -> Packed:
    manifest = type(packed.manifest)()
    manifest.CopyFrom(packed.manifest)
    manifest.run_id, manifest.version = run, version
    return Packed(manifest, packed.payload)


def _fetcher(target: str, run: str, version: int, relayed: bool, barrier: Any, out: Any) -> None:
    """One fetcher process: fetch `version` (through relays if `relayed`), report when, then keep serving
    until every fetcher is done (a relay that left early would only be routed around)."""
    torch.set_num_threads(1)
    relay = start_relay("127.0.0.1", 0) if relayed else None
    with BrokerClient(target, run, relay=relay) as client:
        barrier.wait()
        started, cpu = time.time(), time.process_time()  # process CPU: gRPC, hashing and relay threads too
        client.fetch(version)
        out.put(("fetched", started, time.time(), time.process_time() - cpu))
        barrier.wait()
        out.put(("served", time.process_time() - cpu))  # its own fetch plus what it relayed to the others
    if relay is not None and relay.server is not None:
        relay.server.stop(0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fan_out_rows(target: str, broker_pid: int) -> list[dict[str, Any]]:
    """Broker egress and time until every fetcher holds a version, full versions vs relay; the CPU seconds
    all of it took (fetchers and broker) and the floor that puts on the time with this machine's cores."""
    run, rows, ctx = "sync-fanout", [], mp.get_context("spawn")
    packed = pack(smollm2_state(), run_id=run, version=0)
    size, version, spans, floors, lone_cpu, cores = len(packed.payload), 0, {}, {}, {}, os.cpu_count() or 1
    with BrokerClient(target, run, keyframe_every=1) as trainer:
        for relayed in (False, True):
            label = "relay" if relayed else "full versions from the broker"
            for fetchers in FETCHERS:
                version += 1
                trainer.publish_packed(_renumbered(packed, run, version))
                before = trainer.status().bytes_out
                barrier, out = ctx.Barrier(fetchers), ctx.Queue()
                args = (target, run, version, relayed, barrier, out)
                procs = [ctx.Process(target=_fetcher, args=args) for _ in range(fetchers)]
                broker_cpu = cpu_seconds(broker_pid)
                for proc in procs:
                    proc.start()
                reports = [out.get(timeout=600) for _ in range(2 * fetchers)]
                for proc in procs:
                    proc.join(60)
                broker_cpu = cpu_seconds(broker_pid) - broker_cpu
                egress = (trainer.status().bytes_out - before) / size
                times = [r[1:] for r in reports if r[0] == "fetched"]
                span = spans[relayed, fetchers] = max(end for _, end, _ in times) - min(start for start, _, _ in times)
                total_cpu = broker_cpu + sum(r[1] for r in reports if r[0] == "served")
                floors[relayed, fetchers] = total_cpu / cores
                goal = GOAL_EGRESS if relayed and fetchers == 4 else None
                tag = f"fan-out {fetchers}, {label}"
                rows.append(row(f"{tag}: broker egress ÷ one version", egress, goal, "×", False))
                rows.append(row(f"{tag}: until all hold it", span, None, "s", False))
                own_cpu = statistics.fmean(cpu for *_, cpu in times)
                if fetchers == 1:
                    lone_cpu[relayed] = own_cpu
                rows.append(row(f"{tag}: CPU s per fetcher (own fetch)", own_cpu, None, "s", False))
                rows.append(row(f"{tag}: CPU s in all (fetchers + broker)", total_cpu, None, "s", False))
            ratio = spans[relayed, 4] / spans[relayed, 1]
            goal = GOAL_FAN_OUT_TIME if relayed else None
            rows.append(row(f"fan-out, {label}: time for 4 ÷ time for 1", ratio, goal, "×", False))
            # However well the fetchers overlap, 4 of them cannot finish before their CPU seconds ÷ the cores:
            # as measured (contention inflates it), and from one lone fetcher's CPU (4 × that ÷ the cores).
            floor = floors[relayed, 4] / spans[relayed, 1]
            rows.append(row(f"fan-out, {label}: CPU floor for 4 ({cores} cores) ÷ time for 1", floor, None, "×", False))
            alone = 4 * lone_cpu[relayed] / cores / spans[relayed, 1]
            rows.append(
                row(f"fan-out, {label}: one fetcher's CPU × 4 ÷ {cores} cores ÷ time for 1", alone, None, "×", False)
            )
    print(f"fan-out: {size / 1e6:.0f} MB per version", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per learning rate (s = 10 needs 10)")
    parser.add_argument("--quick", action="store_true", help="2 steps per learning rate (s = 2 instead of 10)")
    parser.add_argument("--fan-out-only", action="store_true", help="only the fan-out rows, full vs relay (~2 min)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2
    torch.manual_seed(0)
    proc, target = start_broker()
    name = "sync-fanout" if args.fan_out_only else "sync"
    try:
        rows: list[dict[str, Any]] = []
        if not args.fan_out_only:
            for lr in (1e-6, 5e-4):
                rows += lr_rows(lr, args.steps, "bf16", target)
                record(name, rows)  # what is measured so far survives an interrupted run
            rows += lr_rows(1e-6, 1, "fp32")
        rows += fan_out_rows(target, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    print_table(rows)
    print(f"recorded in {record(name, rows)}")


if __name__ == "__main__":
    main()
