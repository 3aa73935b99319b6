"""A broker that restarts with an empty memory store right after the trainer published a version: a worker
that had not fetched it yet would wait forever. The trainer notices (while it waits for samples) and
publishes that version again. Real Redis, a real broker server restarted on the same port, the real
training loop on the tiny model; a stand-in generator plays inference + reward and, like a real worker,
answers a prompt only once its `min_version` is on the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from harness import BASE, check_ledger, read_jsonl
from transformers import AutoTokenizer

from cadence import streams
from cadence.broker.main import build
from cadence.broker.settings import BrokerSettings
from cadence.clients.broker import BrokerClient
from cadence.config import parse_run_config
from cadence.net import free_port
from cadence.tasks import load_problems
from cadence.trainer import loop as loop_module
from cadence.trainer.engine import TrainEngine
from cadence.trainer.feeder import Feeder, PromptPlan
from cadence.trainer.loop import TrainLoop
from cadence.v1 import common_pb2

torch.set_num_threads(1)
RUN = "broker-loss"


class Broker:
    """A broker server in this process that can be restarted, empty, on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.start()

    def start(self) -> None:
        settings = BrokerSettings(host="127.0.0.1", grpc_port=self.port, store="memory", retain=2)
        self.server, self.servicer = build(settings)
        self.server.start()

    def restart_empty(self) -> None:
        self.servicer.close()
        self.server.stop(0)
        self.start()


class Generator(threading.Thread):
    """Answers each prompt once its `min_version` is on the broker; restarts the broker the first time it
    sees version `lose`, before any worker fetched it."""

    def __init__(self, redis_url: str, broker: Broker, tokenizer, lose: int) -> None:
        super().__init__(daemon=True)
        client = streams.connect(redis_url)
        self.consumer = streams.StreamConsumer(
            client, streams.stream_key(RUN, "prompts"), "inference", "gen", common_pb2.Prompt, block_ms=100
        )
        self.out = streams.StreamProducer(client, streams.stream_key(RUN, "scored"))
        self.broker, self.lose, self.tokenizer = broker, lose, tokenizer
        self.client = BrokerClient(f"127.0.0.1:{broker.port}", RUN)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for entry in self.consumer.read(8):
                self.wait_for_version(entry.message.min_version)
                self.out.add(self.answer(entry.message))
                self.consumer.ack([entry.id])

    def wait_for_version(self, version: int) -> None:
        while version > 0 and not self.halt.is_set():  # the seed (version 0) is every worker's start
            latest = self.client.latest()
            if latest is not None and latest.version >= version:
                if latest.version == self.lose:
                    self.lose = -1
                    self.broker.restart_empty()
                    continue
                return
            time.sleep(0.1)

    def answer(self, prompt: common_pb2.Prompt) -> common_pb2.ScoredRollout:
        eos = self.tokenizer.eos_token_id
        samples, scores = [], []
        for i in range(prompt.sampling.n):
            answer = prompt.reference if i % 2 == 0 else str(int(prompt.reference) + 1 + i)
            ids = self.tokenizer(f" \\boxed{{{answer}}}", add_special_tokens=False)["input_ids"] + [eos]
            samples.append(common_pb2.Sample(text=answer, token_ids=ids, finish_reason="stop"))
            scores.append(common_pb2.Score(reward=float(i % 2 == 0)))
        rollout = common_pb2.Rollout(
            prompt=prompt,
            samples=samples,
            prompt_token_ids=self.tokenizer(prompt.text)["input_ids"],
            policy_version=prompt.min_version,
        )
        return common_pb2.ScoredRollout(rollout=rollout, scores=scores)


def test_a_version_lost_by_a_restarted_broker_is_published_again(
    redis_url: str,
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(loop_module, "BROKER_CHECK_SECONDS", 1.0)  # production: 10 s of waiting
    overrides = {"run_id": RUN, "steps": 4, "batch_prompts": 2, "sync_every": 2, "optimizer": {"lr": 1e-3}}
    config = parse_run_config(BASE | overrides | {"tasks": [{"name": "toy", "limit": 50}]})
    broker = Broker()
    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny_model_dir)
    generator = Generator(redis_url, broker, tokenizer, lose=2)
    generator.start()
    client = streams.connect(redis_url)
    plan = PromptPlan(config, [load_problems(task) for task in config.tasks], RUN)
    try:
        with BrokerClient(f"127.0.0.1:{broker.port}", RUN) as transport, caplog.at_level(logging.WARNING):
            engine = TrainEngine(untrained_tiny_model_dir, config)
            train = TrainLoop(engine, tokenizer, client, Feeder(client, plan), transport, tmp_path, RUN)
            watchdog = threading.Timer(60, train.request_stop, ("the lost version was never published again",))
            watchdog.start()
            assert train.run().state == "done"
            watchdog.cancel()
            assert transport.latest().version == 4
    finally:
        generator.halt.set()
        generator.join(5)
        broker.servicer.close()
        broker.server.stop(0)
    assert generator.lose == -1, "the broker was never restarted: the fault was not injected"
    assert "the broker lost version 2" in caplog.text
    check_ledger(read_jsonl(tmp_path / "ledger.jsonl"), config)
