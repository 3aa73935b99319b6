"""The weight file the vLLM engine hands its engine process: exact bytes, any dtype, one buffer's views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence.inference import vllm_engine
from cadence.inference.vllm_engine import handoff_dir, write_safetensors
from cadence.weights import pack, unpack


def test_views_of_one_fetched_buffer_round_trip_bit_exact(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "norm.weight": torch.randn(5, generator=gen),
        "empty": torch.zeros(0, 3),
        "step": torch.tensor([3], dtype=torch.int64),
    }
    packed = pack(state, run_id="r", version=1, chunk_bytes=64)
    fetched = unpack(packed.manifest, packed.payload)  # zero-copy views sharing one buffer, as a fetch gives
    path = tmp_path / "w.safetensors"
    write_safetensors(path, list(fetched.items()))
    loaded = load_file(str(path))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].view(torch.uint8), tensor.contiguous().view(torch.uint8))


def test_a_small_or_missing_shared_memory_falls_back_to_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_engine, "SHARED_MEMORY", tmp_path / "no-such-dir")
    assert handoff_dir(1 << 20) != tmp_path / "no-such-dir"
    monkeypatch.setattr(vllm_engine, "SHARED_MEMORY", tmp_path)
    assert handoff_dir(1 << 20) == tmp_path
    assert handoff_dir(1 << 62) != tmp_path
