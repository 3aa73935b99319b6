"""The rollout worker against a real redis-server and a real broker on loopback, with the HF engine on the
random-init tiny model: the cadence rule (min_version), workers sharing a stream, a worker SIGKILLed
mid-batch, SIGTERM, a Redis outage, and prompts that cannot be generated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file

from cadence.clients import BrokerClient
from cadence.inference.engine import SamplingParams
from cadence.inference.hf_engine import HFEngine
from cadence.inference.worker import RolloutWorker
from cadence.net import free_port
from cadence.streams import GROUPS, StreamProducer, connect, stream_key
from cadence.v1 import common_pb2

torch.set_num_threads(1)
RUN = "inf-test"
PROMPTS_KEY, ROLLOUTS_KEY = stream_key(RUN, "prompts"), stream_key(RUN, "rollouts")
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)


class RunningWorker:
    """A `RolloutWorker` on its own thread with its own HF engine."""

    def __init__(self, model_dir: Path, redis_url: str, broker: str, name: str, **options: int) -> None:
        self.engine = HFEngine(model_dir)
        self.worker = RolloutWorker(
            self.engine, connect(redis_url), RUN, BrokerClient(broker, RUN), worker_id=name, **options
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.worker.close()
        assert not self.thread.is_alive()


@pytest.fixture
def workers(untrained_tiny_model_dir: Path, redis_url: str, broker: str) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(name: str, url: str = redis_url, **options: int) -> RunningWorker:
        options.setdefault("block_ms", 200)
        started.append(RunningWorker(untrained_tiny_model_dir, url, broker, name, **options))
        return started[-1]

    yield start
    for worker in started:
        worker.close()


def prompt(
    index: int, min_version: int = 0, sampling: common_pb2.SamplingParams = GREEDY, max_version: int | None = None
) -> common_pb2.Prompt:
    return common_pb2.Prompt(
        run_id=RUN, prompt_id=f"p{index}", task="math", text=f"What is {index}+1?", min_version=min_version,
        max_version=max_version, sampling=sampling,
    )  # fmt: skip


def rollouts(url: str) -> list[common_pb2.Rollout]:
    client = redis.Redis.from_url(url)
    out = []
    for _, fields in client.xrange(ROLLOUTS_KEY):
        rollout = common_pb2.Rollout()
        rollout.ParseFromString(fields[b"m"])
        out.append(rollout)
    client.close()
    return out


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def group_pending(url: str) -> int:
    return int(redis.Redis.from_url(url).xpending(PROMPTS_KEY, GROUPS["prompts"])["pending"])


def weights(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    base = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    return {name: t + 0.5 * torch.randn(t.shape, generator=gen) for name, t in base.items()}


def test_min_version_rule_holds_a_prompt_until_its_version_is_loaded(
    workers: Callable[..., RunningWorker], redis_url: str, broker: str, untrained_tiny_model_dir: Path
) -> None:
    running = workers("w0")
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([prompt(0), prompt(3, min_version=3)])
    wait_until(lambda: len(rollouts(redis_url)) == 1, what="the min_version 0 prompt")
    publisher = BrokerClient(broker, RUN)
    for version in (1, 2):
        publisher.publish(weights(untrained_tiny_model_dir, version), version)
    time.sleep(1.0)
    assert [r.prompt.prompt_id for r in rollouts(redis_url)] == ["p0"]
    assert running.engine.version == 0  # versions 1 and 2 were not needed: no sync
    v3 = weights(untrained_tiny_model_dir, 3)
    publisher.publish(v3, 3)
    wait_until(lambda: len(rollouts(redis_url)) == 2, what="the min_version 3 prompt")
    first, held = rollouts(redis_url)
    assert (first.policy_version, held.prompt.prompt_id, held.policy_version) == (0, "p3", 3)
    reference = HFEngine(untrained_tiny_model_dir)
    reference.load_weights(v3.items(), 3)
    expected = reference.generate([held.prompt.text], SamplingParams.from_pb(GREEDY)).completions[0]
    assert list(held.samples[0].token_ids) == expected.samples[0].token_ids
    assert list(held.prompt_token_ids) == expected.prompt_token_ids
    assert held.worker_id == "w0" and held.generation_seconds > 0
    assert group_pending(redis_url) == 0


def test_a_batch_is_tokenized_while_the_worker_waits_for_its_version(
    workers: Callable[..., RunningWorker], redis_url: str, broker: str, untrained_tiny_model_dir: Path
) -> None:
    """At s = 1 the version a batch needs is being fetched when the batch arrives: its prompts are rendered
    and tokenized meanwhile, so generation starts as soon as the version is loaded."""
    running = workers("w0")
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([prompt(i, min_version=1) for i in range(5)])
    wait_until(lambda: len(running.worker._held) == 5, what="the batch in hand")
    wait_until(lambda: len(running.engine._encoded) >= 5, timeout=5, what="the batch tokenized before version 1")
    assert running.engine.version == 0 and rollouts(redis_url) == []
    BrokerClient(broker, RUN).publish(weights(untrained_tiny_model_dir, 1), 1)
    wait_until(lambda: len(rollouts(redis_url)) == 5, what="the batch generated at version 1")
    assert {r.policy_version for r in rollouts(redis_url)} == {1}


def test_a_worker_takes_the_newest_version_its_prompts_allow(
    workers: Callable[..., RunningWorker], redis_url: str, broker: str, untrained_tiny_model_dir: Path
) -> None:
    """async_lag: prompts allowing versions 0..4 are generated at 4 once it is published (not at the oldest,
    0, though 0 is loaded and allowed); a prompt capped at 0 in the same batch goes first, still at 0."""
    running = workers("w0")
    producer = StreamProducer(connect(redis_url), PROMPTS_KEY)
    producer.add_many([prompt(0, max_version=4)])
    wait_until(lambda: len(rollouts(redis_url)) == 1, what="the first prompt")
    BrokerClient(broker, RUN).publish(weights(untrained_tiny_model_dir, 4), 4)
    wait_until(lambda: running.worker.watcher.newest() == 4, what="the worker to see version 4")
    producer.add_many([prompt(1, max_version=4), prompt(2, max_version=0), prompt(3, max_version=4)])
    wait_until(lambda: len(rollouts(redis_url)) == 4, what="the three prompts")
    versions = [(r.prompt.prompt_id, r.policy_version) for r in rollouts(redis_url)]
    assert versions == [("p0", 0), ("p2", 0), ("p1", 4), ("p3", 4)]
    assert running.engine.version == 4 and group_pending(redis_url) == 0


def test_two_workers_share_a_stream_without_loss_or_duplicates(
    workers: Callable[..., RunningWorker], redis_url: str
) -> None:
    sampled = common_pb2.SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=1)
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([prompt(i, sampling=sampled) for i in range(24)])
    workers("a", batch_prompts=3)
    workers("b", batch_prompts=3)
    wait_until(lambda: len(rollouts(redis_url)) >= 24, what="24 rollouts")
    time.sleep(0.3)
    done = rollouts(redis_url)
    assert sorted(r.prompt.prompt_id for r in done) == sorted(f"p{i}" for i in range(24))
    assert {r.worker_id for r in done} == {"a", "b"}
    assert all(len(r.samples) == 4 for r in done)
    assert group_pending(redis_url) == 0


def test_ungeneratable_prompts_go_to_the_dead_letter_stream(
    workers: Callable[..., RunningWorker], redis_url: str
) -> None:
    too_long = common_pb2.Prompt(run_id=RUN, prompt_id="long", text="1+" * 40, sampling=GREEDY)
    bad_n = prompt(1, sampling=common_pb2.SamplingParams(n=500))
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([too_long, bad_n, prompt(2)])
    workers("w0")
    wait_until(lambda: len(rollouts(redis_url)) == 1, what="the valid prompt")
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: client.xlen(f"{PROMPTS_KEY}:dead") == 2, what="two dead letters")
    assert rollouts(redis_url)[0].prompt.prompt_id == "p2"
    assert group_pending(redis_url) == 0


def test_a_redis_outage_is_waited_out_without_losing_prompts(
    untrained_tiny_model_dir: Path, private_redis, broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    running = RunningWorker(untrained_tiny_model_dir, private_redis.url, broker, "w0", block_ms=200)
    try:
        StreamProducer(connect(private_redis.url), PROMPTS_KEY).add_many([prompt(i) for i in range(4)])
        wait_until(lambda: len(rollouts(private_redis.url)) == 4, what="rollouts before the outage")
        private_redis.kill()
        time.sleep(2.0)
        assert running.thread.is_alive()
        private_redis.start()  # AOF: the stream and the group come back
        StreamProducer(connect(private_redis.url), PROMPTS_KEY).add_many([prompt(i) for i in range(4, 8)])
        wait_until(lambda: len(rollouts(private_redis.url)) == 8, what="rollouts after the outage")
    finally:
        running.close()
    assert sorted(r.prompt.prompt_id for r in rollouts(private_redis.url)) == sorted(f"p{i}" for i in range(8))
    assert any("Redis unavailable" in record.getMessage() for record in caplog.records)


def serve_worker(model_dir: Path, redis_url: str, broker: str, name: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "CADENCE_RUN_ID": RUN,
        "CADENCE_WORKER_ID": name,
        "CADENCE_BATCH_PROMPTS": "4",
        "CADENCE_RECLAIM_IDLE_MS": "1500",
        "CADENCE_GRACE_SECONDS": "10",
    }
    args = [sys.executable, "-m", "cadence.app.cli", "serve", "inference", "--engine", "hf", "--model", str(model_dir)]
    args += ["--host", "127.0.0.1", "--grpc-port", str(free_port()), "--redis-url", redis_url, "--broker-addr", broker]
    return subprocess.Popen(args, env=env)


def consumer_pending(url: str, name: str) -> int:
    client = redis.Redis.from_url(url)
    for consumer in client.xinfo_consumers(PROMPTS_KEY, GROUPS["prompts"]) if client.exists(PROMPTS_KEY) else []:
        if consumer["name"] in (name, name.encode()):
            return int(consumer["pending"])
    return 0


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    workers: Callable[..., RunningWorker], redis_url: str, broker: str, untrained_tiny_model_dir: Path
) -> None:
    slow = common_pb2.SamplingParams(n=8, temperature=1.0, max_tokens=48, seed=3)
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([prompt(i, sampling=slow) for i in range(40)])
    doomed = serve_worker(untrained_tiny_model_dir, redis_url, broker, "doomed")
    try:
        wait_until(lambda: len(rollouts(redis_url)) >= 4 and consumer_pending(redis_url, "doomed") > 0, 60, "a batch")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        doomed.kill()
    abandoned = consumer_pending(redis_url, "doomed")
    assert abandoned > 0  # killed while holding a batch
    workers("survivor", batch_prompts=8, reclaim_idle_ms=1500)
    wait_until(lambda: len(rollouts(redis_url)) >= 40, 120, "all 40 rollouts")
    time.sleep(0.5)
    done = rollouts(redis_url)
    assert sorted(r.prompt.prompt_id for r in done) == sorted(f"p{i}" for i in range(40))
    assert {r.worker_id for r in done} == {"doomed", "survivor"}
    assert group_pending(redis_url) == 0


def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(
    redis_url: str, broker: str, untrained_tiny_model_dir: Path
) -> None:
    slow = common_pb2.SamplingParams(n=8, temperature=1.0, max_tokens=48, seed=3)
    StreamProducer(connect(redis_url), PROMPTS_KEY).add_many([prompt(i, sampling=slow) for i in range(40)])
    worker = serve_worker(untrained_tiny_model_dir, redis_url, broker, "leaving")
    try:
        wait_until(lambda: len(rollouts(redis_url)) >= 4 and consumer_pending(redis_url, "leaving") > 0, 60, "a batch")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.kill()
    assert consumer_pending(redis_url, "leaving") == 0  # the batch in hand was finished and acknowledged
    done = rollouts(redis_url)
    assert len(done) < 40 and len({r.prompt.prompt_id for r in done}) == len(done)
