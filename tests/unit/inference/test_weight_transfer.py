"""Cadence's vLLM weight-transfer backend without an engine: registration, the worker-side handoff checks,
the broadcast group's ranks. The engine-level path (a version loaded through it generates with the new
weights; a damaged handoff is refused there too) is in test_vllm_engine.py."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from cadence.inference.vllm_engine import update_info, write_safetensors

pytestmark = pytest.mark.vllm


@pytest.fixture
def tensors() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(6, 4, generator=gen)),
        ("model.norm.weight", torch.randn(4, generator=gen).to(torch.bfloat16)),
    ]


def test_vllm_s_plugin_entry_point_registers_the_backend_idempotently() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from cadence.inference.weight_transfer import BACKEND, CadenceWeightTransferEngine

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("cadence.")]
    register = plugin.load()
    register()
    register()  # vLLM may load plugins more than once in a process
    assert WeightTransferEngineFactory._registry[BACKEND]() is CadenceWeightTransferEngine


def test_a_handoff_holding_exactly_the_declared_tensors_opens(tmp_path: Path, tensors: list) -> None:
    from cadence.inference.weight_transfer import open_handoff

    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors)
    with open_handoff(update_info(tensors, path)) as handle:
        for name, tensor in tensors:
            assert torch.equal(handle.get_tensor(name), tensor)


def test_a_damaged_or_mismatched_handoff_is_refused(tmp_path: Path, tensors: list) -> None:
    from cadence.inference.weight_transfer import REFUSED, open_handoff

    declared = update_info(tensors, tmp_path / "w.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    write_safetensors(truncated, tensors)
    truncated.write_bytes(truncated.read_bytes()[:-4])
    cases = {
        truncated: "cannot be read",
        tmp_path / "missing.safetensors": "cannot be read",
        tmp_path / "reshaped.safetensors": "in the file, declared",
        tmp_path / "recast.safetensors": "in the file, declared",
        tmp_path / "short.safetensors": "lacks",
    }
    write_safetensors(tmp_path / "reshaped.safetensors", [(tensors[0][0], tensors[0][1].T), tensors[1]])
    write_safetensors(tmp_path / "recast.safetensors", [tensors[0], (tensors[1][0], tensors[1][1].float())])
    write_safetensors(tmp_path / "short.safetensors", tensors[:1])
    for path, match in cases.items():
        declared.path = str(path)
        with pytest.raises(ValueError, match=match) as refused, open_handoff(declared):
            pass
        assert str(refused.value).startswith(REFUSED)


def test_an_update_info_with_repeated_or_unaligned_entries_is_refused() -> None:
    from cadence.inference.weight_transfer import REFUSED, CadenceUpdateInfo

    with pytest.raises(ValueError, match=REFUSED):
        CadenceUpdateInfo(names=["a", "a"], dtype_names=["float32"] * 2, shapes=[[1], [1]])
    with pytest.raises(ValueError, match=REFUSED):
        CadenceUpdateInfo(names=["a", "b"], dtype_names=["float32"], shapes=[[1], [1]])


def test_the_broadcast_group_ranks_members_after_the_trainer_and_leaves_others_to_the_broker() -> None:
    from cadence.inference.weight_transfer import BroadcastGroup, CadenceInitInfo
    from cadence.v1 import broker_pb2

    answer = broker_pb2.BroadcastGroup(epoch=3, members=["replica-a", "replica-b"], master_addr="10.0.0.5:29500")
    answer.backend = "gloo"
    group = BroadcastGroup.from_pb(answer)
    infos = [CadenceInitInfo(**group.init_info(replica, timeout_s=5.0)) for replica in group.members]
    assert [(i.rank_offset, i.world_size) for i in infos] == [(1, 3), (2, 3)]
    assert all(
        (i.master_address, i.master_port, i.backend, i.timeout_s) == ("10.0.0.5", 29500, "gloo", 5.0) for i in infos
    )
    assert group.init_info("replica-late") is None  # not in this version's group: catches up from the broker
