"""Cadence's backend for vLLM's weight-transfer API (`vllm.distributed.weight_transfer`), backend "cadence".

vLLM builds this engine inside its worker (the engine-core process `AsyncLLM` spawns) from
`weight_transfer_config={"backend": "cadence"}`, and `VllmEngine` drives it with vLLM's own calls:
`start_weight_update`, `update_weights`, `finish_weight_update` (and `init_weight_transfer_engine` to join a
broadcast group). It takes a version two ways, one update info for both:

- **handoff** (`path` set; the default, CPU and GPU): the tensors Cadence fetched and verified (broker
  client, delta decode) are written once into a safetensors file in shared memory and only its path crosses
  vLLM's RPC. The file's header is checked against the declared names, dtypes and shapes, and its size
  against the header, *before* vLLM's loader touches the model.
- **broadcast** (`path` None; GPU only): the trainer broadcasts the tensors over the NCCL group this worker
  joined, exactly as vLLM's `nccl` backend does (this class is that engine, with the handoff added).

Both load through vLLM's layerwise reload (`initialize_layerwise_reload` → `model.load_weights` →
`finalize_layerwise_reload`, the same calls as the worker's `reload_weights`), begun only once the incoming
set has been checked, then re-process tied layers. vLLM finds the backend through its general-plugin entry
point (`vllm.general_plugins` → `register`, in pyproject.toml): the registry lives in each process, and on
CPU vLLM spawns its engine core, so registering in the parent alone would not reach the worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferUpdateInfo

BACKEND = "cadence"
REFUSED = "cadence weight handoff refused"
"""Prefix of the error a refused handoff raises; the model is untouched (vLLM's RPC carries only the text)."""


def register() -> None:
    """vLLM general plugin: vLLM calls it in every process it starts (possibly more than once)."""
    with contextlib.suppress(ValueError):  # already registered in this process
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, CadenceWeightTransferEngine.__name__)


@dataclass
class CadenceUpdateInfo(WeightTransferUpdateInfo):
    """One version's tensors: names, torch dtype names (`float32`) and shapes, in load order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    path: str | None = None
    """The safetensors handoff file; None: receive a broadcast over the joined NCCL group."""

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"{REFUSED}: {len(self.names)} names, {len(self.dtype_names)} dtypes, {len(self.shapes)} shapes"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{REFUSED}: a tensor name appears twice")


@dataclass(frozen=True)
class BroadcastGroup:
    """Who takes a version by NCCL broadcast, as the broker announces it: the trainer is rank 0, then
    `members` (replica ids, one tensor-parallel-1 vLLM worker each) in rank order. A replica not in the group,
    or whose broadcast failed, fetches the version from the broker instead (`init_info` returns None)."""

    master_address: str
    master_port: int
    members: tuple[str, ...]
    packed: bool = True

    def init_info(self, replica: str) -> dict[str, Any] | None:
        """The `init_weight_transfer_engine` payload for `replica`, or None when it is not a member."""
        if replica not in self.members:
            return None
        info = NCCLWeightTransferInitInfo(
            master_address=self.master_address,
            master_port=self.master_port,
            rank_offset=1 + self.members.index(replica),
            world_size=1 + len(self.members),
            packed=self.packed,
        )
        return worker_init_payload(info)


class CadenceWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine plus the shared-memory handoff; layerwise reload starts only after the checks."""

    update_info_cls = CadenceUpdateInfo  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reloading = False

    def start_weight_update(self) -> None:
        """Nothing yet: the model is left as it is until the first update has been checked."""
        self._reloading = False

    def update_weights(self, update_info: dict[str, Any]) -> None:  # type: ignore[override]
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU ("Cannot access
        # accelerator device when none is available"); synchronize only where there is a device.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: CadenceUpdateInfo) -> None:  # type: ignore[override]
        if update_info.path is None:
            self._begin_reload()
            broadcast = NCCLWeightTransferUpdateInfo(update_info.names, update_info.dtype_names, update_info.shapes)
            super().receive_weights(broadcast)
            return
        with open_handoff(update_info) as handle:
            self._begin_reload()
            self.model.load_weights((name, handle.get_tensor(name)) for name in update_info.names)

    def finish_weight_update(self) -> None:
        if self._reloading:
            super().finish_weight_update()  # finalize_layerwise_reload
            reprocess_tied_layers(self.model)
            self._reloading = False

    def _begin_reload(self) -> None:
        if not self._reloading:
            super().start_weight_update()  # initialize_layerwise_reload
            self._reloading = True


@contextlib.contextmanager
def open_handoff(update_info: CadenceUpdateInfo) -> Iterator[Any]:
    """The handoff file memory-mapped, once it proved to hold exactly the declared tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(update_info.path), framework="pt")
    except (OSError, SafetensorError) as exc:  # missing, truncated, or a corrupt header
        raise ValueError(f"{REFUSED}: {update_info.path} cannot be read as safetensors: {exc}") from exc
    with handle:
        check_handoff(handle, update_info)
        yield handle


def check_handoff(handle: Any, update_info: CadenceUpdateInfo) -> None:
    """Refuse a handoff file whose tensors differ from the declared ones in name, dtype or shape."""
    from cadence.weights import torch_dtype

    if set(handle.keys()) != set(update_info.names):
        missing, extra = set(update_info.names) - set(handle.keys()), set(handle.keys()) - set(update_info.names)
        raise ValueError(f"{REFUSED}: {update_info.path} lacks {sorted(missing)[:3]}, has extra {sorted(extra)[:3]}")
    for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes, strict=True):
        tensor = handle.get_slice(name)
        found = (str(torch_dtype(tensor.get_dtype())).removeprefix("torch."), list(tensor.get_shape()))
        if found != (dtype, list(shape)):
            raise ValueError(f"{REFUSED}: {name} is {found[0]} {found[1]} in the file, declared {dtype} {shape}")


def reprocess_tied_layers(model: torch.nn.Module) -> None:
    """Re-run weight post-processing on layers that share their weight with another (tied embeddings).

    A reload gives `lm_head` no tensor of its own (the checkpoint has none), so vLLM restores its processed
    kernel from before — on CPU a packed copy of the *old* embedding — and logits would use stale weights.
    """
    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(module, "quant_method", None) is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
