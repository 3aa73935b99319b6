"""Prompts as chat messages end to end, on real Redis, a real broker and the HF engine: the feeder sends a
user turn, the rollout worker renders it with the model's chat template, the rollout carries those ids and
the trainer's intake scores exactly them; evaluation prompts take the same path. The toy's template is the
identity, so its ids stay the plain text's."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoTokenizer

from cadence.app.evaluation import _generate, load_eval_problems
from cadence.app.wiring import EngineSampler
from cadence.clients import BrokerClient
from cadence.config import RunConfig
from cadence.errors import InvalidRequest
from cadence.inference.hf_engine import HFEngine
from cadence.inference.worker import RolloutWorker
from cadence.streams import StreamProducer, connect, stream_key
from cadence.tasks import load_problems
from cadence.trainer.feeder import Feeder, PromptPlan
from cadence.trainer.intake import Intake
from cadence.v1 import common_pb2

torch.set_num_threads(1)
RUN = "chat-prompts"
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}=={{ m['content'] }},{% endfor %}{% if add_generation_prompt %}=={% endif %}"
)


@pytest.fixture(scope="module")
def templated_model_dir(untrained_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny Llama with a chat template that frames each turn (`==` … `,`) over its own vocabulary."""
    out = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(untrained_tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _rollouts(model_dir: Path, redis_url: str, broker: str) -> tuple[list[common_pb2.Rollout], PromptPlan]:
    """One step's prompts from the feeder through a running rollout worker."""
    config = RunConfig.model_validate(
        {"run_id": RUN, "batch_prompts": 3, "steps": 2, "sampling": {"n": 2, "max_tokens": 4},
         "tasks": [{"name": "toy", "limit": 6}]}
    )  # fmt: skip
    plan = PromptPlan(config, [load_problems(task) for task in config.tasks], RUN)
    client = connect(redis_url)
    client.delete(stream_key(RUN, "prompts"), stream_key(RUN, "rollouts"))
    StreamProducer(client, stream_key(RUN, "prompts")).add_many(plan.prompts_for(0))
    engine = HFEngine(model_dir)
    worker = RolloutWorker(engine, client, RUN, BrokerClient(broker, RUN), worker_id="w", block_ms=200)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while client.xlen(stream_key(RUN, "rollouts")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(15)
    worker.close()
    out = []
    for _, fields in redis.Redis.from_url(redis_url).xrange(stream_key(RUN, "rollouts")):
        rollout = common_pb2.Rollout()
        rollout.ParseFromString(fields[b"m"])
        out.append(rollout)
    assert len(out) == 3
    return out, plan


def _intake(plan: PromptPlan, redis_url: str, tokenizer: object) -> Intake:
    client = connect(redis_url)
    return Intake(client, plan.config, tokenizer, Feeder(client, plan), RUN, "trainer-0")


def test_rollouts_carry_the_templated_prompt_ids_and_the_trainer_scores_them(
    templated_model_dir: Path, redis_url: str, broker: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(templated_model_dir)
    rollouts, plan = _rollouts(templated_model_dir, redis_url, broker)
    intake = _intake(plan, redis_url, tokenizer)
    for rollout in rollouts:
        text = rollout.prompt.text
        assert tokenizer.decode(rollout.prompt_token_ids) == f"<s>=={text},=="
        scored = common_pb2.ScoredRollout(rollout=rollout, scores=[common_pb2.Score(reward=1.0)] * 2)
        assert intake._group(scored).prompt_ids == list(rollout.prompt_token_ids)
    bare = common_pb2.ScoredRollout(rollout=common_pb2.Rollout(prompt=rollouts[0].prompt, samples=rollouts[0].samples))
    with pytest.raises(InvalidRequest, match="prompt_token_ids"):
        intake._group(bare)  # never a re-tokenized text


def test_the_toy_keeps_its_plain_text_ids(untrained_tiny_model_dir: Path, redis_url: str, broker: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny_model_dir)
    rollouts, _ = _rollouts(untrained_tiny_model_dir, redis_url, broker)
    assert all(list(r.prompt_token_ids) == tokenizer(r.prompt.text).input_ids for r in rollouts)


def test_evaluation_prompts_go_through_the_template(templated_model_dir: Path) -> None:
    problems = load_eval_problems("toy", "test", limit=2)
    engine = HFEngine(templated_model_dir)
    completions = _generate(EngineSampler(engine), problems, 1, 0.0, 1.0, 2)
    for problem, completion in zip(problems, completions, strict=True):
        assert engine.tokenizer.decode(completion.prompt_token_ids) == f"<s>=={problem.text},=="
