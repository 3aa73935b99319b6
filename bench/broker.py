"""Weight-sync broker benchmark: throughput against raw TCP, fan-out, and end-to-end sync latency.

What it measures, all in one run on this machine, with the broker as its own process (`cadence serve broker`,
memory store) on loopback:
1. the ceiling: a raw loopback TCP copy of the same payload bytes (sendall → recv_into, no hashing);
2. Publish and Fetch of a 256 MiB fp32 state dict through `BrokerClient`, in MB/s and as a ratio to (1)
   (goal ≥ 0.5×); packing is timed apart, the fetch includes sha256 verification and unpacking;
   Two reference rows explain the gap: the same Fetch through gRPC with the messages untouched, and sha256
   on one thread. On 2 cores the bare stream already keeps both busy (broker sending, client receiving),
   so verification cannot overlap it and the verified rate is their harmonic sum; with spare cores the
   hash pool (`cadence.weights.hash_pool`) verifies a chunk while the next arrives;
3. fan-out: 1, 2 and 4 fetcher processes (like inference pods) fetching one version at once: aggregate MB/s;
4. end-to-end sync latency for SmolLM2-135M-shaped bf16 weights (~270 MB): from the trainer's `publish`
   call (packing included) until a worker process that was watching has the whole state dict in memory.

Simplifications: synthetic random tensors (the same shapes as SmolLM2-135M), one host, best of `--repeats`
runs for the throughputs. MB = 10^6 bytes.

Run: `.venv/bin/python bench/broker.py [--mb 256] [--repeats 3]` (takes about a minute; not run in CI).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import torch
from _common import print_table, record, row

from cadence.clients import BrokerClient
from cadence.grpc import channel_options, wait_healthy
from cadence.net import free_port
from cadence.v1 import broker_pb2
from cadence.weights import pack

RUN = "bench"
SMOLLM2 = {"vocab": 49152, "hidden": 576, "intermediate": 1536, "layers": 30, "kv_dim": 192}


def start_broker() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "cadence.app.cli", "serve", "broker", "--host", "127.0.0.1", "--grpc-port", str(port)]
    env = {**os.environ, "CADENCE_LOG_LEVEL": "WARNING", "CADENCE_MAX_BYTES": str(8 << 30)}
    proc = subprocess.Popen([*args, "--store", "memory", "--retain", "2"], env=env)
    target = f"127.0.0.1:{port}"
    wait_healthy(target, timeout=60)
    return proc, target


def raw_tcp_seconds(payload: bytearray) -> float:
    """Copy the payload over one loopback TCP connection into a preallocated buffer."""
    listener = socket.create_server(("127.0.0.1", 0))
    sink = bytearray(len(payload))
    done = threading.Event()

    def receive() -> None:
        conn, _ = listener.accept()
        view, got = memoryview(sink), 0
        while got < len(sink):
            got += conn.recv_into(view[got:])
        conn.close()
        done.set()

    threading.Thread(target=receive, daemon=True).start()
    started = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as sender:
        sender.sendall(payload)
    done.wait()
    elapsed = time.perf_counter() - started
    listener.close()
    assert sink == payload
    return elapsed


def bare_stream_seconds(target: str, version: int) -> float:
    """A Fetch of `version` through gRPC with nothing done to the messages: the transport's own ceiling."""
    with grpc.insecure_channel(target, options=channel_options()) as chan:
        serializer = broker_pb2.FetchRequest.SerializeToString
        fetch = chan.unary_stream("/cadence.v1.Broker/Fetch", request_serializer=serializer)
        started = time.perf_counter()
        for _ in fetch(broker_pb2.FetchRequest(run_id=RUN, version=version)):
            pass
        return time.perf_counter() - started


def sha256_mbps(payload: bytes | bytearray | memoryview) -> float:
    started = time.perf_counter()
    hashlib.sha256(payload).digest()
    return len(payload) / (time.perf_counter() - started) / 1e6


def flat_state(megabytes: int) -> dict[str, torch.Tensor]:
    """`megabytes` MiB of fp32 in 4 MiB tensors."""
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(megabytes // 4)}


def smollm2_state() -> dict[str, torch.Tensor]:
    """Random bf16 tensors with SmolLM2-135M's names and shapes (tied embeddings)."""
    h, i, kv = SMOLLM2["hidden"], SMOLLM2["intermediate"], SMOLLM2["kv_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (SMOLLM2["vocab"], h)}
    for layer in range(SMOLLM2["layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (h, h),
            f"{prefix}.self_attn.k_proj.weight": (kv, h),
            f"{prefix}.self_attn.v_proj.weight": (kv, h),
            f"{prefix}.self_attn.o_proj.weight": (h, h),
            f"{prefix}.mlp.gate_proj.weight": (i, h),
            f"{prefix}.mlp.up_proj.weight": (i, h),
            f"{prefix}.mlp.down_proj.weight": (h, i),
            f"{prefix}.input_layernorm.weight": (h,),
            f"{prefix}.post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}


def _fetcher(target: str, version: int, barrier: Any, out: Any) -> None:
    torch.set_num_threads(1)
    with BrokerClient(target, RUN) as client:
        barrier.wait()
        started = time.time()
        state = client.fetch(version)
        out.put((started, time.time(), sum(t.numel() * t.element_size() for t in state.values())))


def fan_out(target: str, version: int, fetchers: int) -> float:
    """Aggregate MB/s of `fetchers` processes fetching one version together."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(fetchers), ctx.Queue()
    procs = [ctx.Process(target=_fetcher, args=(target, version, barrier, out)) for _ in range(fetchers)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join()
    span = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    return sum(nbytes for _, _, nbytes in results) / span / 1e6


def _watcher(target: str, after: int, ready: Any, out: Any) -> None:
    torch.set_num_threads(1)
    with BrokerClient(target, RUN) as client:
        watch = client.watch(after)
        ready.set()
        info = next(watch)
        fetch_started = time.time()
        state = client.fetch(info.version)
        out.put((time.time(), time.time() - fetch_started, len(state)))


def sync_latency(target: str, version: int) -> tuple[float, float, float]:
    """(end-to-end s, pack + publish s, fetch s) for SmolLM2-135M-shaped weights."""
    state = smollm2_state()
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_watcher, args=(target, version - 1, ready, out))
    proc.start()
    ready.wait(120)
    time.sleep(0.5)  # the watch stream is open
    with BrokerClient(target, RUN) as client:
        started = time.time()
        client.publish(state, version)
        published = time.time() - started
    loaded_at, fetch_seconds, count = out.get(timeout=300)
    proc.join()
    assert count == len(state)
    return loaded_at - started, published, fetch_seconds


def throughput(target: str, megabytes: int, repeats: int) -> tuple[list[dict[str, Any]], int]:
    state = flat_state(megabytes)
    started = time.perf_counter()
    packed = pack(state, run_id=RUN, version=1)
    pack_seconds = time.perf_counter() - started
    size = len(packed.payload)
    raw = min(raw_tcp_seconds(packed.payload) for _ in range(repeats))
    publish, fetch = [], []
    with BrokerClient(target, RUN) as client:
        for version in range(1, repeats + 1):
            packed = pack(state, run_id=RUN, version=version)
            started = time.perf_counter()
            client.publish_packed(packed)
            publish.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.fetch(version)
            fetch.append(time.perf_counter() - started)
        bare = min(bare_stream_seconds(target, repeats) for _ in range(repeats))
    mbps = {"raw": size / raw / 1e6, "publish": size / min(publish) / 1e6, "fetch": size / min(fetch) / 1e6}
    rows = [
        row(f"raw loopback TCP copy, {size / 1e6:.0f} MB", mbps["raw"], None, "MB/s"),
        row("pack (state dict → payload + sha256)", size / pack_seconds / 1e6, None, "MB/s"),
        row("publish (chunks verified, stored)", mbps["publish"], None, "MB/s"),
        row("publish / raw TCP", mbps["publish"] / mbps["raw"], 0.5, "x"),
        row("fetch (verified, unpacked)", mbps["fetch"], None, "MB/s"),
        row("fetch / raw TCP", mbps["fetch"] / mbps["raw"], 0.5, "x"),
        row("  reference: gRPC Fetch stream, messages untouched", size / bare / 1e6, None, "MB/s"),
        row("  reference: sha256, one thread", sha256_mbps(packed.payload), None, "MB/s"),
    ]
    return rows, repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="state dict size in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per throughput figure (best is kept)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.repeats = 64, 1
    proc, target = start_broker()
    try:
        rows, version = throughput(target, args.mb, args.repeats)
        for fetchers in (1, 2, 4):
            rows.append(
                row(
                    f"fan-out: {fetchers} fetcher processes, aggregate",
                    fan_out(target, version, fetchers),
                    None,
                    "MB/s",
                )
            )
        total, published, fetched = sync_latency(target, version + 1)
        rows.append(row("SmolLM2-135M bf16 sync, publish → worker loaded", total, None, "s", higher_is_better=False))
        rows.append(row("  of which pack + publish", published, None, "s", higher_is_better=False))
        rows.append(row("  of which fetch (after the watch fired)", fetched, None, "s", higher_is_better=False))
    finally:
        proc.terminate()
        proc.wait(30)
    print_table(rows)
    print(f"recorded in {record('broker', rows)}")


if __name__ == "__main__":
    main()
