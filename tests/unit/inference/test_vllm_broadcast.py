"""The collective path on GPU: the trainer broadcasts a version over NCCL with vLLM's own trainer engine
(`nccl`), and `VllmEngine` receives it through Cadence's backend (`BroadcastGroup` → `join_broadcast` →
`load_broadcast`). Needs two CUDA devices (NCCL puts one rank per device): vLLM on cuda:0, the trainer on
cuda:1. Not run in the CPU sandbox, where vLLM's `nccl` backend cannot run (PyNcclCommunicator needs CUDA).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from cadence.inference.engine import SamplingParams
from cadence.inference.hf_engine import HFEngine

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
PROMPTS = ["What is 12+34?", "What is 5+7?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14)


class OneReplica:
    """`VLLMWeightSyncClient` for one replica: joins with the broker-announced group's payload for it."""

    def __init__(self, engine: Any, group: Any, replica: str, version: int) -> None:
        self.engine, self.group, self.replica, self.version = engine, group, replica, version

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ours = self.group.init_info(self.replica)
        assert {k: v for k, v in init_info.items() if k in ours} == ours  # what vLLM's trainer would send
        self.engine.join_broadcast(ours)

    def start_weight_update(self) -> None:
        pass  # load_broadcast starts and finishes the session itself

    def update_weights(self, update_info: Any) -> None:
        from cadence.inference.weight_transfer import CadenceUpdateInfo

        self.engine.load_broadcast(CadenceUpdateInfo(**update_info), self.version)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass


def tokens(generation: Any) -> list[list[int]]:
    return [c.samples[0].token_ids for c in generation.completions]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one device per rank: trainer + vLLM")
def test_a_broadcast_version_generates_like_the_trainer_s_weights(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from cadence.inference.vllm_engine import VllmEngine
    from cadence.inference.weight_transfer import BroadcastGroup

    engine = VllmEngine(tiny_model_dir, dtype="float32")
    try:
        before = engine.generate(PROMPTS, GREEDY)
        torch.cuda.set_device(1)
        policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).to("cuda:1")
        gen = torch.Generator(device="cuda:1").manual_seed(1)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=gen, device="cuda:1"))
        port = free_port()
        group = BroadcastGroup("127.0.0.1", port, members=("replica-0",))
        client = OneReplica(engine, group, "replica-0", version=1)
        trainer = WeightTransferTrainerFactory.trainer_init(
            NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=port, world_size=2, rank=0),
            client=client,
            source=ModuleSource(policy),
        )
        trainer.send_weights()
        after = engine.generate(PROMPTS, GREEDY)
        reference = HFEngine(tiny_model_dir)
        reference.load_weights({k: v.cpu() for k, v in policy.state_dict().items()}.items(), version=1)
        expected = reference.generate(PROMPTS, GREEDY)
        assert after.policy_version == 1
        assert tokens(after) != tokens(before)
        assert tokens(after) == tokens(expected)
        trainer.shutdown()
    finally:
        engine.close()
