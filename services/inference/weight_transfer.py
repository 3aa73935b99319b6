"""Cadence's backend for vLLM's weight-transfer API (`vllm.distributed.weight_transfer`), backend "cadence".

vLLM builds this engine inside its worker (the engine-core process `AsyncLLM` spawns) from
`weight_transfer_config={"backend": "cadence"}`, and `VllmEngine` drives it with vLLM's own calls:
`start_weight_update`, `update_weights`, `finish_weight_update` (and `init_weight_transfer_engine` to join a
broadcast group). It takes a version two ways, one update info for both:

- **handoff** (`path` set; the default, CPU and GPU): the tensors Cadence fetched and verified (broker
  client, delta decode) are written once into a safetensors file in shared memory and only its path crosses
  vLLM's RPC. The file's header is checked against the declared names, dtypes and shapes, and its size
  against the header, *before* vLLM's loader touches the model.
- **broadcast** (`path` None): the trainer (rank 0) broadcasts the version's payload — the tensors back to back
  in the broker manifest's order (`cadence.trainer.broadcasting`) — over the group this worker joined with
  `init_weight_transfer_engine`: on GPU vLLM's NCCL communicator (PyNccl, as its `nccl` backend builds it), on
  CPU a gloo group from vLLM's stateless process-group helper. The whole payload is received into host memory
  and sha256-checked against the broker's manifest for the version before the model is touched; a damaged or
  timed-out broadcast is refused with the model as it was (gloo collectives time out; NCCL ones do not).

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
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferUpdateInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

BACKEND = "cadence"
REFUSED = "cadence weight handoff refused"
"""Prefix of the error a refused handoff raises; the model is untouched (vLLM's RPC carries only the text)."""
BROADCAST_FAILED = "cadence broadcast failed"
"""Prefix of the error a broadcast that timed out or failed its sha256 raises; the model is untouched."""


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
    """The safetensors handoff file; None: receive a broadcast over the joined group."""
    manifest: bytes | None = None
    """A broadcast's full `WeightManifest` from the broker (serialized): the payload it describes is received and
    checked against it, then the tensors in `names` are loaded."""

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"{REFUSED}: {len(self.names)} names, {len(self.dtype_names)} dtypes, {len(self.shapes)} shapes"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{REFUSED}: a tensor name appears twice")


@dataclass(kw_only=True)
class CadenceInitInfo(NCCLWeightTransferInitInfo):
    """vLLM's NCCL init info plus the collective to use and how long any of its calls may wait."""

    backend: str = "nccl"
    """`nccl` (GPU, vLLM's PyNccl) or `gloo` (CPU)."""
    timeout_s: float = 30.0


@dataclass(frozen=True)
class BroadcastGroup:
    """Who takes a version by broadcast, as the broker announces it (`cadence.broker.groups`): the trainer is
    rank 0, then `members` (replica ids, one tensor-parallel-1 vLLM worker each) in rank order. A replica not in
    the group, or whose broadcast failed, fetches the version from the broker instead (`init_info` is None)."""

    master_address: str
    master_port: int
    members: tuple[str, ...]
    backend: str = "nccl"

    @classmethod
    def from_pb(cls, group: Any) -> BroadcastGroup:
        """From the broker's `cadence.v1.BroadcastGroup` answer."""
        host, _, port = group.master_addr.rpartition(":")
        return cls(host.strip("[]"), int(port), tuple(group.members), group.backend)

    def init_info(self, replica: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """The `init_weight_transfer_engine` payload for `replica`, or None when it is not a member."""
        if replica not in self.members:
            return None
        info = CadenceInitInfo(
            master_address=self.master_address,
            master_port=self.master_port,
            rank_offset=1 + self.members.index(replica),
            world_size=1 + len(self.members),
            backend=self.backend,
            timeout_s=timeout_s,
        )
        return worker_init_payload(info)


class CadenceWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine plus the shared-memory handoff and a gloo group on CPU; layerwise reload starts only
    after the checks."""

    init_info_cls = CadenceInitInfo  # type: ignore[assignment]
    update_info_cls = CadenceUpdateInfo  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reloading = False
        self._gloo: Any = None  # the CPU group (a torch ProcessGroup), when the trainer chose gloo

    def init_transfer_engine(self, init_info: CadenceInitInfo) -> None:  # type: ignore[override]
        """Join the trainer's group (a new epoch replaces the one before)."""
        self.shutdown()
        if init_info.backend == "nccl":
            super().init_transfer_engine(init_info)  # vLLM's PyNccl group
            return
        if init_info.backend != "gloo" or init_info.master_address is None or init_info.master_port is None:
            raise ValueError(f"{BROADCAST_FAILED}: backend {init_info.backend!r} needs gloo or nccl and host:port")
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        self._gloo = stateless_init_torch_distributed_process_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            backend="gloo",
            timeout=timedelta(seconds=init_info.timeout_s),
        )

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
            self._receive_broadcast(update_info)
            return
        with open_handoff(update_info) as handle:
            self._begin_reload()
            self.model.load_weights((name, handle.get_tensor(name)) for name in update_info.names)

    def finish_weight_update(self) -> None:
        if self._reloading:
            super().finish_weight_update()  # finalize_layerwise_reload
            reprocess_tied_layers(self.model)
            self._reloading = False

    def _receive_broadcast(self, update_info: CadenceUpdateInfo) -> None:
        """Receive the payload whole, check it against the broker's manifest, then load the named tensors."""
        from cadence.errors import IntegrityError
        from cadence.v1 import common_pb2
        from cadence.weights import iter_tensors, verify_payload

        if update_info.manifest is None:
            raise ValueError(f"{BROADCAST_FAILED}: a broadcast update carries the version's manifest")
        manifest = common_pb2.WeightManifest.FromString(update_info.manifest)
        try:
            payload = self._receive_payload(manifest.total_bytes)
        except Exception as exc:  # a member missing, a peer gone, the time up: the group is unusable
            self.shutdown()
            raise ValueError(f"{BROADCAST_FAILED}: version {manifest.version} did not arrive: {exc}") from exc
        try:
            verify_payload(manifest, payload)
        except IntegrityError as exc:
            raise ValueError(f"{BROADCAST_FAILED}: version {manifest.version} arrived damaged: {exc}") from exc
        self._begin_reload()
        wanted = set(update_info.names)
        self.model.load_weights((name, t) for name, t in iter_tensors(manifest, payload) if name in wanted)

    def _receive_payload(self, nbytes: int) -> Any:
        """The broadcast payload in host memory, slice by slice (`cadence.weights.BROADCAST_SLICE_BYTES`)."""
        from cadence.weights import BROADCAST_SLICE_BYTES, allocate

        if self._gloo is None and self.model_update_group is None:
            raise RuntimeError("no broadcast group joined; call init_weight_transfer_engine first")
        payload = allocate(nbytes)
        data = torch.frombuffer(payload, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        for start in range(0, nbytes, BROADCAST_SLICE_BYTES):
            piece = data[start : start + BROADCAST_SLICE_BYTES]
            if self._gloo is not None:
                options = torch.distributed.BroadcastOptions()
                options.rootRank = 0
                self._gloo.broadcast([piece], options).wait()
            else:  # NCCL receives on the device
                staged = torch.empty(piece.numel(), dtype=torch.uint8, device=self.device)
                self.model_update_group.broadcast(staged, src=0, stream=torch.cuda.current_stream())
                piece.copy_(staged)
        return payload

    def shutdown(self) -> None:
        super().shutdown()
        if self._gloo is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            group, self._gloo = self._gloo, None
            with contextlib.suppress(Exception):  # a group whose peer died may not shut down cleanly
                stateless_destroy_torch_distributed_process_group(group)

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
