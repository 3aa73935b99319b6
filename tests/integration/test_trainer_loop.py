"""The training loop against real Redis, a real broker and the real tiny model (CPU, one process).

The inference and reward services are not started: a rule-abiding stand-in thread reads the real
`prompts` stream and writes real `ScoredRollout` messages into the real `scored` stream (the stream
contract), generating at each prompt's `min_version` and scoring toy answers exactly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cadence import streams
from cadence.broker.main import build
from cadence.broker.settings import BrokerSettings
from cadence.clients.broker import BrokerClient
from cadence.config import RunConfig
from cadence.net import free_port
from cadence.tasks import load_problems
from cadence.trainer.engine import TrainEngine
from cadence.trainer.feeder import Feeder, PromptPlan
from cadence.trainer.loop import TrainLoop
from cadence.trainer.publishing import Publisher
from cadence.trainer.retention import archived
from cadence.v1 import common_pb2

torch.set_num_threads(1)
METRIC_KEYS = {
    "step", "version", "loss", "reward_mean", "accuracy", "chosen_logps", "rejected_logps", "margin", "entropy",
    "length_mean", "length_hist", "staleness_mean", "staleness_max", "pairs_kept", "pairs_skipped",
    "rejected_rollouts", "samples", "tokens_per_s", "time_wait", "time_compute", "time_publish", "step_time",
    "time_generation", "time_scoring",
}  # fmt: skip


@pytest.fixture
def broker_target() -> Iterator[str]:
    server, servicer = build(BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory", retain=4))
    port = server.start()
    yield f"127.0.0.1:{port}"
    servicer.close()
    server.stop(0.5)


class Generator(threading.Thread):
    """Plays inference + reward: answers each prompt at its `min_version`, half the samples right.

    `bad_step`: the first prompt of that step is first answered by version 0 (breaking the rule);
    the trainer must reject it and re-enqueue the prompt, which is then answered correctly.
    `duplicate_step`: every rollout of that step is written twice (an at-least-once redelivery).
    """

    def __init__(self, redis_url: str, run_id: str, broker: str, tokenizer: Any, bad_step: int | None = None):
        super().__init__(daemon=True)
        self.client = streams.connect(redis_url)
        self.consumer = streams.StreamConsumer(
            self.client, streams.stream_key(run_id, "prompts"), "inference", "gen-0", common_pb2.Prompt, block_ms=100
        )
        self.out = streams.StreamProducer(self.client, streams.stream_key(run_id, "scored"))
        self.broker = BrokerClient(broker, run_id)
        self.tokenizer, self.bad_step = tokenizer, bad_step
        self.duplicate_step: int | None = None
        self.halt = threading.Event()
        self.seen: list[tuple[int, int, int]] = []  # (step, min_version, broker latest when seen)

    def run(self) -> None:
        while not self.halt.is_set():
            for entry in self.consumer.read(8):
                self.answer(entry.message)
                self.consumer.ack([entry.id])

    def answer(self, prompt: common_pb2.Prompt) -> None:
        latest = self.broker.latest()
        self.seen.append((prompt.step, prompt.min_version, latest.version if latest else 0))
        version = prompt.min_version
        if prompt.step == self.bad_step:
            self.bad_step, version = None, 0 if prompt.min_version else 1
        eos = self.tokenizer.eos_token_id
        samples, scores = [], []
        for i in range(prompt.sampling.n):
            answer = prompt.reference if i % 2 == 0 else str(int(prompt.reference) + 1 + i)
            ids = self.tokenizer(f" \\boxed{{{answer}}}", add_special_tokens=False)["input_ids"] + [eos]
            samples.append(common_pb2.Sample(text=answer, token_ids=ids, finish_reason="stop"))
            scores.append(common_pb2.Score(reward=float(i % 2 == 0), reason="correct" if i % 2 == 0 else "incorrect"))
        prompt_ids = self.tokenizer(prompt.text)["input_ids"]
        rollout = common_pb2.Rollout(
            prompt=prompt, samples=samples, prompt_token_ids=prompt_ids, policy_version=version
        )
        copies = 2 if prompt.step == self.duplicate_step else 1
        self.out.add_many([common_pb2.ScoredRollout(rollout=rollout, scores=scores)] * copies)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.broker.close()


def run_config(**fields: Any) -> RunConfig:
    base = {
        "run_id": "loop",
        "steps": 4,
        "batch_prompts": 2,
        "sync_every": 2,
        "max_inflight": 2,
        "sampling": {"n": 4, "max_tokens": 14},
        "optimizer": {"lr": 1e-3},
        "tasks": [{"name": "toy", "limit": 50}],
    }
    return RunConfig.model_validate(base | fields)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def generator(redis_url: str, broker_target: str, untrained_tiny_model_dir: Path) -> Iterator[Generator]:
    gen = Generator(redis_url, "loop", broker_target, AutoTokenizer.from_pretrained(untrained_tiny_model_dir), 2)
    gen.start()
    yield gen
    gen.stop()


@pytest.fixture
def broker(broker_target: str) -> Iterator[BrokerClient]:
    """The trainer's real broker client for run `loop`."""
    with BrokerClient(broker_target, "loop") as client:
        yield client


@pytest.fixture
def new_loop(
    generator: Generator, redis_url: str, broker: BrokerClient, untrained_tiny_model_dir: Path, tmp_path: Path
) -> Callable[..., TrainLoop]:
    """`new_loop(config, transport=broker)`: a training loop on the tiny model, real Redis and the broker, its run
    folder `tmp_path`, the stand-in generator answering. A second call is the trainer restarted in that folder."""
    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny_model_dir)

    def make(config: RunConfig, transport: Any = broker) -> TrainLoop:
        client = streams.connect(redis_url)
        plan = PromptPlan(config, [load_problems(task) for task in config.tasks], config.run_id)
        engine = TrainEngine(untrained_tiny_model_dir, config)
        return TrainLoop(engine, tokenizer, client, Feeder(client, plan), transport, tmp_path, config.run_id)

    return make


def test_semi_online_s2_trains_only_on_rule_versions(
    generator: Generator, broker: BrokerClient, new_loop: Callable[..., TrainLoop], tmp_path: Path
) -> None:
    """s = 2: steps 0–1 train on version 0, steps 2–3 on version 2; a version-0 rollout for step 2 is
    rejected (counted, prompt re-enqueued), never trained on; block 1 is released only once version 2 is
    on the broker; step 1's rollouts delivered twice are trained once; versions 2 and 4 are published; the
    final policy is saved as an HF model."""
    generator.duplicate_step = 1
    loop = new_loop(run_config())
    assert loop.run().state == "done"
    assert broker.latest().version == 4
    ledger = read_jsonl(tmp_path / "ledger.jsonl")
    assert [row["policy_versions"] for row in ledger] == [[0, 0], [0, 0], [2, 2], [2, 2]]
    assert [row["samples"] for row in ledger] == [8, 8, 8, 8]
    assert {(step, min_version) for step, min_version, _ in generator.seen} == {(0, 0), (1, 0), (2, 2), (3, 2)}
    assert all(latest >= min_version for _, min_version, latest in generator.seen)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert set(metrics[-1]) >= METRIC_KEYS
    assert metrics[-1]["rejected_rollouts"] == 1 and metrics[1]["rejected_rollouts"] == 0
    assert metrics[-1]["duplicates"] == 2
    assert [m["version"] for m in metrics] == [0, 2, 2, 4]
    assert metrics[0]["accuracy"] == 0.5 and metrics[0]["pairs_kept"] == 2
    assert len(metrics[0]["length_hist"]) == 10 and sum(metrics[0]["length_hist"]) == 8
    assert streams.read_meta(loop.client, "loop")["state"] == "done"
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    policy = loop.engine.full_state_dict()
    assert all(torch.equal(policy[k], v) for k, v in final.state_dict().items())


@pytest.mark.parametrize("ref_sync_every", [2, None])
def test_reference_is_the_last_sync_point_or_the_seed(
    ref_sync_every: int | None,
    broker: BrokerClient,
    new_loop: Callable[..., TrainLoop],
    untrained_tiny_model_dir: Path,
) -> None:
    """s = 2, 3 steps: with ref_sync_every = 2 the reference is exactly version 2 (as published, not the
    current policy); with null it is still the seed."""
    config = run_config(steps=3, ref_sync_every=ref_sync_every)
    loop = new_loop(config)
    loop.run()
    version2 = broker.fetch(2)
    reference, policy = loop.engine.reference.state_dict(), loop.engine.full_state_dict()
    seed = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir).state_dict()
    expected = version2 if ref_sync_every else seed
    assert all(torch.equal(reference[k], expected[k]) for k in expected)
    assert not all(torch.equal(reference[k], policy[k]) for k in policy)


def test_offline_enqueues_everything_at_version_zero_and_never_publishes(
    generator: Generator, broker: BrokerClient, new_loop: Callable[..., TrainLoop], tmp_path: Path
) -> None:
    config = run_config(sync_every=None, steps=3)
    generator.bad_step = None
    loop = new_loop(config)
    loop.feeder.top_up(trainer_step=0, version=0)
    assert loop.feeder.next_step == 3  # the whole run at once
    loop.run()
    assert broker.latest() is None
    assert [row["policy_versions"] for row in read_jsonl(tmp_path / "ledger.jsonl")] == [[0, 0]] * 3
    assert {min_version for _, min_version, _ in generator.seen} == {0}


class CrashAfterPublishing:
    """Fault injection around the real client: the trainer dies right after version `at` is uploaded."""

    def __init__(self, client: BrokerClient, at: int) -> None:
        self.client, self.at = client, at

    def latest(self) -> Any:
        return self.client.latest()

    def publish(self, state: dict, version: int) -> Any:
        info = self.client.publish(state, version)
        if version == self.at:
            raise RuntimeError("killed")
        return info


def test_crash_and_restart_resume_without_loss_or_duplication(
    generator: Generator, broker: BrokerClient, new_loop: Callable[..., TrainLoop], tmp_path: Path
) -> None:
    """Online (s = 1), checkpoint every 2 steps, 6 steps. The trainer dies after publishing version 4
    (its last checkpoint is after step 2), restarts from that checkpoint, replays steps 2–3 from the
    unacknowledged scored entries without re-publishing 3 and 4, and finishes: every prompt trained
    exactly once, every step recorded once, versions 1–6 each published once."""
    config = run_config(sync_every=1, steps=6, checkpoint_every=2)
    generator.bad_step = None
    crashing = new_loop(config, CrashAfterPublishing(broker, 4))
    with pytest.raises(RuntimeError, match="killed"):
        crashing.run()
    assert [row["step"] for row in read_jsonl(tmp_path / "ledger.jsonl")] == [0, 1, 2]
    restarted = new_loop(config)
    assert restarted.run().state == "done"
    assert broker.latest().version == 6
    ledger = read_jsonl(tmp_path / "ledger.jsonl")
    assert [row["step"] for row in ledger] == list(range(6))
    trained = [pid for row in ledger for pid in row["prompt_ids"]]
    enqueued = archived(tmp_path, "prompts")  # trimmed at each checkpoint, once every stage acknowledged them
    live = restarted.client.xrange(streams.stream_key("loop", "prompts"))
    enqueued |= {i.decode(): common_pb2.Prompt.FromString(f[streams.FIELD]).prompt_id for i, f in live}
    assert sorted(trained) == sorted(enqueued.values())
    assert restarted.client.xlen(streams.stream_key("loop", "scored")) == 0, "acknowledged entries stay in Redis"
    assert [row["policy_versions"] for row in ledger] == [[t, t] for t in range(6)]
    assert restarted.intake.consumer.pending() == 0


def test_grpo_old_policy_is_the_last_published_version_with_a_fixed_reference(
    broker: BrokerClient, new_loop: Callable[..., TrainLoop], untrained_tiny_model_dir: Path, tmp_path: Path
) -> None:
    """GRPO, s = 2, reference fixed at the seed: π_old is its own snapshot, equal to version 2 after 3 steps."""
    config = run_config(steps=3, ref_sync_every=None, algorithm={"type": "grpo", "kl_beta": 0.01})
    loop = new_loop(config)
    loop.run()
    version2 = broker.fetch(2)
    assert loop.engine.old_policy is not None
    old, reference = loop.engine.old_policy.state_dict(), loop.engine.reference.state_dict()
    seed = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir).state_dict()
    assert all(torch.equal(old[k], version2[k]) for k in version2)
    assert all(torch.equal(reference[k], seed[k]) for k in seed)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[2]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # first step after a sync: π = π_old
    assert metrics[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)  # second step of block 0: π moved


@pytest.mark.parametrize(
    ("keep", "kept"), [(None, ["step-3", "step-4"]), (4, ["step-1", "step-2", "step-3", "step-4"])]
)
def test_keep_checkpoints_sets_how_many_stay_on_the_volume(
    keep: int | None, kept: list[str], new_loop: Callable[..., TrainLoop], tmp_path: Path
) -> None:
    """A checkpoint every step over 4 steps: the default keeps the newest two; `keep_checkpoints` 4 keeps every
    one (bench.sweep evaluates each checkpoint after the run)."""
    extra = {} if keep is None else {"keep_checkpoints": keep}
    config = run_config(sync_every=1, checkpoint_every=1, **extra)
    new_loop(config).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == kept


def test_online_releases_the_next_prompts_before_its_records_and_checkpoint(
    generator: Generator, new_loop: Callable[..., TrainLoop], tmp_path: Path
) -> None:
    """s = 1 with a checkpoint every step: step t + 1's prompts are in the stream before the checkpoint after
    step t is written (at s = 1 the generator would idle through it), and each step's clock starts where the
    previous one's ended, so the checkpoint counts in the next step's wait."""
    config = run_config(sync_every=1, steps=4, checkpoint_every=1, keep_checkpoints=4)
    generator.bad_step = None
    new_loop(config).run()
    released: dict[int, float] = {}
    for entry_id, prompt_id in archived(tmp_path, "prompts").items():
        step = int(prompt_id[1:].split(".")[0])
        released[step] = min(released.get(step, float("inf")), int(entry_id.split("-")[0]) / 1000)
    for step in range(1, 4):
        written = max(p.stat().st_mtime for p in (tmp_path / "checkpoints" / f"step-{step}").rglob("*"))
        assert released[step] < written, f"step {step}'s prompts waited for the checkpoint before them"
    for row in read_jsonl(tmp_path / "metrics.jsonl"):
        assert row["step_time"] == pytest.approx(row["time_wait"] + row["time_compute"] + row["time_publish"])


class CountingClient(BrokerClient):
    """The real client, counting the `Latest` calls it makes."""

    asked = 0

    def latest(self) -> Any:
        self.asked += 1
        return super().latest()


def test_the_publisher_asks_the_broker_only_until_it_has_uploaded_a_version(broker_target: str) -> None:
    """A restarted trainer replaying versions 2–3 (an earlier process published 3) skips them after asking;
    once it has uploaded 4 itself, 5 and 6 go up without a `Latest` round trip each."""
    state = {"w": torch.zeros(8)}
    with CountingClient(broker_target, "pub") as client:
        client.publish(state, 3)
        publisher = Publisher(client, threading.Event())
        for version in range(2, 7):
            publisher.publish(state, version)
        assert client.asked == 3
        assert [info.version for info in client.status().versions if info.run_id == "pub"][-1] == 6
