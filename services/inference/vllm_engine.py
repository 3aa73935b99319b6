"""The vLLM engine: with `weight_transfer.py` (its backend in vLLM's worker), every vLLM-specific line of Cadence.

`VllmEngine` drives vLLM's `AsyncLLM` from an event loop on a background thread, so callers stay
synchronous and concurrent `generate` calls (the worker and gRPC `Generate`) are batched together by vLLM.

Weights change in place, never by restarting, through vLLM's weight-transfer API: the engine is built with
`weight_transfer_config={"backend": "cadence"}` (`weight_transfer.py`, the worker-side engine) and drives
`start_weight_update` / `update_weights` / `finish_weight_update`. RPC arguments cross a process boundary and
cannot carry tensors, and pickling hundreds of MB through vLLM's RPC is slow (SmolLM2-135M: 11 s here), so
the tensors are written once into a safetensors file in shared memory (/dev/shm; the temp dir where it is
missing or too small) and only its path and the tensors' names, dtypes and shapes cross the RPC. The prefix
cache is reset afterwards, or cached KV blocks of the old weights would be reused. vLLM spawns an engine
process: scripts that build this engine need a `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cadence.errors import BroadcastFailed, ConfigError, InvalidRequest
from cadence.inference.engine import Engine, Sample, SamplingParams
from cadence.paths import cadence_home
from cadence.weights import dtype_name

if TYPE_CHECKING:
    import torch

    from cadence.inference.weight_transfer import CadenceUpdateInfo
    from cadence.v1 import common_pb2

T = TypeVar("T")
SHARED_MEMORY = Path("/dev/shm")


def configure_vllm_environment(kv_cache_gib: float) -> None:
    """vLLM reads these at import: cache inside Cadence's home, KV cache size, use every CPU core."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cadence_home() / "vllm"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Write `tensors` as a safetensors file with one copy of their bytes (views of one buffer are fine)."""
    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, tensor in tensors:
            out.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def handoff_dir(nbytes: int) -> Path:
    """Where to put a weight file for the engine process: shared memory when it has room (a container's
    /dev/shm is often 64 MB unless a larger one is mounted, as the chart does), else the temp dir."""
    try:
        free = shutil.disk_usage(SHARED_MEMORY).free
    except OSError:
        free = 0
    if free > nbytes + (64 << 20) and os.access(SHARED_MEMORY, os.W_OK):
        return SHARED_MEMORY
    return Path(tempfile.gettempdir())


class VllmEngine(Engine):
    """vLLM `AsyncLLM` behind the synchronous `Engine` interface."""

    kind = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        version: int = 0,
        dtype: str | None = None,
        kv_cache_gib: float = 1.0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
    ) -> None:
        super().__init__(model_path, version=version)
        configure_vllm_environment(kv_cache_gib)
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        from cadence.inference.weight_transfer import BACKEND

        _require_plugin()

        on_cpu = current_platform.is_cpu()
        self._args = AsyncEngineArgs(
            model=self.model_path,
            # vLLM on CPU would downcast fp32 checkpoints to bf16; Cadence keeps fp32 there (DESIGN.md §3).
            dtype=dtype or ("float32" if on_cpu else "auto"),
            max_model_len=max_model_len,
            # torch.compile costs minutes of start-up on CPU for little gain; on GPU keep CUDA graphs.
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            # vLLM 0.32 on CPU: a seeded request whose prefill is split across steps crashes the engine
            # ("CPU Generator does not use offset" when the partial step's sample is discarded), which
            # seeded evaluations of long MATH-500 prompts hit; whole prefills only there.
            **(_whole_prefills(Path(self.model_path), max_model_len) if on_cpu else {}),
            weight_transfer_config={"backend": BACKEND},
            disable_log_stats=True,
        )
        self._checkpoint = _checkpoint_shapes(Path(self.model_path))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._llm = self._run(self._start())
        self._max_len = int(self._llm.model_config.max_model_len)

    async def _start(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        # Built inside the loop so AsyncLLM starts its output handler on it.
        return AsyncLLM.from_engine_args(self._args)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        if params.temperature == 0:  # vLLM refuses n > 1 when greedy: one sample stands for all n
            rows = self._run(self._generate_all(prompts, _vllm_params(params, n=1)))
            return [row * params.n for row in rows]
        return self._run(self._generate_all(prompts, _vllm_params(params, n=params.n)))

    async def _generate_all(self, prompts: list[list[int]], params: Any) -> list[list[Sample]]:
        return list(await asyncio.gather(*(self._generate_one(ids, params) for ids in prompts)))

    async def _generate_one(self, prompt_ids: list[int], params: Any) -> list[Sample]:
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
            final = output
        if final is None:
            raise RuntimeError("vLLM returned no output for a request")
        return [_sample(completion) for completion in final.outputs]

    def _load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        checked = list(self._checked(tensors))
        if not checked:
            raise InvalidRequest("no weights given: a weight update needs at least one tensor")
        nbytes = sum(tensor.numel() * tensor.element_size() for _, tensor in checked)
        handle, name = tempfile.mkstemp(prefix="cadence-weights-", suffix=".safetensors", dir=handoff_dir(nbytes))
        os.close(handle)
        path = Path(name)
        try:
            write_safetensors(path, checked)
            # A handoff the worker refuses (its file differs from what was declared) leaves the model untouched.
            self._run(self._transfer(update_info(checked, path)))
        finally:
            path.unlink(missing_ok=True)

    def join_broadcast(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's broadcast group (`BroadcastGroup.init_info`: gloo on CPU, NCCL on GPU); a new epoch
        replaces the group before. `BroadcastFailed` when the rendezvous does not complete in its timeout."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        try:
            self._run(self._llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)))
        except Exception as exc:  # vLLM's RPC returns the worker's error as text only
            raise BroadcastFailed(f"joining the broadcast group failed: {exc}") from exc

    def leave_broadcast(self) -> None:
        """Drop the broadcast group (after a failed broadcast; the next epoch joins a new one)."""
        self._run(self._llm.shutdown_weight_transfer_engine())

    def load_broadcast(self, manifest: common_pb2.WeightManifest, version: int) -> None:
        """Receive `version` from the trainer's broadcast over the joined group and load it, once the whole payload
        matched `manifest` (the broker's). Runs on every member while the trainer broadcasts; like `load_weights`
        it holds generation back. `BroadcastFailed` (timed out, or damaged): the model and version are unchanged,
        fetch the version from the broker.
        """
        import torch

        from cadence.weights import torch_dtype

        specs = [
            (s.name, torch.empty(list(s.shape), dtype=torch_dtype(s.dtype), device="meta")) for s in manifest.tensors
        ]
        info = update_info(list(self._checked(specs)), None)
        info.manifest = manifest.SerializeToString()
        self._replace_weights(lambda: self._run(self._transfer(info)), version)

    async def _transfer(self, info: CadenceUpdateInfo) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        from cadence.inference.weight_transfer import BROADCAST_FAILED, REFUSED

        await self._llm.start_weight_update()
        try:
            await self._llm.update_weights(WeightTransferUpdateRequest(update_info=asdict(info)))
        except Exception as exc:  # vLLM's RPC returns the worker's error as text only
            if REFUSED in str(exc):  # the worker ended the session before touching the model
                raise InvalidRequest(str(exc)) from exc
            if BROADCAST_FAILED in str(exc):  # likewise, and the replica fetches the version instead
                raise BroadcastFailed(str(exc)) from exc
            raise
        await self._llm.finish_weight_update()
        await self._llm.reset_prefix_cache()  # or cached KV blocks of the old weights would be reused

    def _checked(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Refuse names and shapes the checkpoint does not have and repeated names; drop a tied `lm_head.weight`."""
        seen: set[str] = set()
        for name, tensor in tensors:
            if name in seen:
                raise InvalidRequest(f"weight {name!r} is given twice; a weight update names each tensor once")
            seen.add(name)
            expected = self._checkpoint.get(name)
            if expected is None:
                if name == "lm_head.weight" and "model.embed_tokens.weight" in self._checkpoint:
                    continue  # tied to the embeddings: vLLM shares one tensor
                raise InvalidRequest(f"weight {name!r} is not in the checkpoint of {self.model_path}; wrong model?")
            if tuple(tensor.shape) != expected:
                raise InvalidRequest(f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
            yield name, tensor

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._shutdown())
        self._llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        # Stop the output handler first, or it reports the engine process's exit as a failure.
        handler, self._llm.output_handler = self._llm.output_handler, None
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        self._llm.shutdown()


def _require_plugin() -> None:
    """vLLM finds the "cadence" weight-transfer backend through Cadence's installed entry point."""
    from importlib.metadata import entry_points

    if not any(ep.value.startswith("cadence.") for ep in entry_points(group="vllm.general_plugins")):
        raise ConfigError(
            "vLLM cannot find Cadence's weight-transfer backend: the `vllm.general_plugins` entry point is not "
            "installed; reinstall Cadence (`pip install -e .` or `make setup`) in the environment that runs vLLM"
        )


def update_info(tensors: list[tuple[str, torch.Tensor]], path: Path | None) -> CadenceUpdateInfo:
    """What the worker-side engine expects: every tensor's name, dtype and shape, in the file's order."""
    from cadence.inference.weight_transfer import CadenceUpdateInfo

    return CadenceUpdateInfo(
        names=[name for name, _ in tensors],
        dtype_names=[str(tensor.dtype).removeprefix("torch.") for _, tensor in tensors],
        shapes=[list(tensor.shape) for _, tensor in tensors],
        path=None if path is None else str(path),
    )


def _whole_prefills(model_dir: Path, max_model_len: int | None) -> dict[str, Any]:
    """Engine arguments that schedule every prompt's prefill in one step (no chunked prefill)."""
    config = json.loads((model_dir / "config.json").read_text())
    longest = max_model_len or int(config.get("max_position_embeddings", 2048))
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(longest, 2048)}


def _vllm_params(params: SamplingParams, n: int) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=list(params.stop) or None,
        logprobs=0,  # the sampled token's logprob only
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _sample(completion: Any) -> Sample:
    token_ids = list(completion.token_ids)
    logprobs = [completion.logprobs[i][token].logprob for i, token in enumerate(token_ids)]
    return Sample(completion.text, token_ids, logprobs, str(completion.finish_reason or "length"))


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers of a model directory."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    if not shapes:
        raise InvalidRequest(f"no *.safetensors in {model_dir}; the vLLM engine needs a safetensors checkpoint")
    return shapes
