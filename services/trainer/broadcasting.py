"""The trainer's side of the collective path: broadcast each published version to the broker's group.

Before it publishes version v the trainer asks the broker for the group that will take v (`FormGroup`,
`cadence.broker.groups`), announcing where it would open a new epoch's rendezvous; it always publishes v to the
broker too (late joiners, replicas that fall back, verification: members check what they receive against the
broker's manifest). Then it broadcasts v's payload — the tensors back to back in manifest order, in
`BROADCAST_SLICE_BYTES` slices — as rank 0 of the group, on a background thread so training goes on; the next
version's broadcast waits for it. A new epoch opens a new group first (the members join it when they see v).

Every collective call is bounded (`timeout_s`): a broadcast that fails (a member never came, a peer died) closes
the group and is reported with the next `FormGroup`, so the group re-forms at a later epoch with the replicas
that rejoined; those members fetch v from the broker meanwhile.

`gloo` needs torch only (the trainer image has no vLLM): the group is formed exactly as vLLM's
`stateless_init_torch_distributed_process_group` forms it on the replica (a TCPStore at `tcp://host:port`, a
prefix store named after it, a gloo process group). `nccl` uses vLLM's own trainer endpoint (PyNccl; install
vLLM in the trainer's environment).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cadence.errors import ConfigError
from cadence.logging import get_logger
from cadence.net import free_port
from cadence.v1 import broker_pb2
from cadence.weights import BROADCAST_SLICE_BYTES, Packed

if TYPE_CHECKING:
    from cadence.clients.broker import BrokerClient

log = get_logger(__name__)


class Broadcaster:
    """Forms the broker's group for each version and broadcasts the version to it as rank 0."""

    def __init__(self, broker: BrokerClient, host: str, *, backend: str = "gloo", timeout_s: float = 30.0) -> None:
        """`host`: the trainer's address replicas reach (each epoch's rendezvous opens on a free port there)."""
        self.broker, self.host, self.backend, self.timeout_s = broker, host, backend, timeout_s
        self._group: Any = None  # the open collective of `_epoch`
        self._store: Any = None  # its rendezvous server (gloo), which lives as long as the group
        self._epoch = 0
        self._failed: int | None = None  # an epoch whose broadcast failed, to report with the next FormGroup
        self._sending: threading.Thread | None = None
        self._rendezvous = ""  # the address announced for a new epoch; a fresh port once an epoch took it
        self.sent = 0  # versions broadcast whole (for tests and logs)
        self.group = broker_pb2.BroadcastGroup()  # the broker's answer to the last `form`

    def form(self, version: int) -> broker_pb2.BroadcastGroup:
        """The group that takes `version` (ask before publishing it, so members that see it find their group)."""
        self.wait()
        if not self._rendezvous:
            self._rendezvous = f"{self.host}:{free_port(self.host)}"
        request = broker_pb2.FormGroupRequest(
            run_id=self.broker.run_id,
            version=version,
            master_addr=self._rendezvous,
            failed_epoch=self._failed,
            backend=self.backend,
        )
        group = self.group = self.broker.unary("FormGroup", request)
        self._failed = None
        if group.members and group.epoch != self._epoch and group.master_addr == self._rendezvous:
            self._rendezvous = ""  # this epoch opens there; the next one gets another port
        return group

    def send(self, group: broker_pb2.BroadcastGroup, packed: Packed) -> None:
        """Broadcast `packed` (the version `group` was formed for, as published) in the background."""
        self.wait()
        if not group.members:
            self.close()  # nobody to send to: let the last epoch's group go
            return
        self._sending = threading.Thread(target=self._send, args=(group, packed), name="broadcast", daemon=True)
        self._sending.start()

    def wait(self) -> None:
        """Until the broadcast in flight has ended (sent or failed; each is bounded by `timeout_s`)."""
        if self._sending is not None:
            self._sending.join()
            self._sending = None

    def close(self) -> None:
        self.wait()
        self._close_group()

    def _send(self, group: broker_pb2.BroadcastGroup, packed: Packed) -> None:
        version = packed.manifest.version
        try:
            if group.epoch != self._epoch:
                self._close_group()
                self._group, self._store = open_group(group, self.timeout_s)
                self._epoch = group.epoch
            broadcast_payload(self._group, packed, group.backend)
        except Exception as error:  # a member missing or gone: it and the others fetch from the broker
            log.warning(
                "broadcast of version %d to epoch %d failed (%s); members fetch it from the broker",
                version,
                group.epoch,
                error,
            )
            self._failed = group.epoch
            self._close_group()
            return
        self.sent += 1
        log.info("broadcast version %d", version, extra={"epoch": group.epoch, "members": len(group.members)})

    def _close_group(self) -> None:
        group, self._group, self._store, self._epoch = self._group, None, None, 0
        end = getattr(group, "shutdown", None) or getattr(group, "destroy", None)  # gloo, PyNccl
        if end is not None:
            try:
                end()
            except Exception as error:  # a group whose peer died may not shut down cleanly
                log.warning("closing the broadcast group failed: %s", error)


def open_group(group: broker_pb2.BroadcastGroup, timeout_s: float) -> tuple[Any, Any]:
    """Open rank 0 of `group`'s collective at its announced rendezvous (waits, bounded, for every member): the
    collective and what must stay alive with it."""
    host, _, port = group.master_addr.rpartition(":")
    world = 1 + len(group.members)
    if group.backend == "nccl":
        try:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
        except ImportError as error:
            raise ConfigError(
                "NCCL broadcasts need vLLM in the trainer's environment (`pip install cadence[vllm]`); "
                "or set CADENCE_BROADCAST_BACKEND=gloo"
            ) from error
        return trainer_init({"master_address": host.strip("[]"), "master_port": int(port), "world_size": world}), None
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    timeout = timedelta(seconds=timeout_s)
    address = f"tcp://{host}:{port}"  # vLLM's `get_tcp_uri`: the prefix both sides name their keys under
    store, _, _ = next(dist.rendezvous(address, 0, world, timeout=timeout))
    gloo = ProcessGroupGloo(dist.PrefixStore(address, store), 0, world, timeout=timeout)
    gloo._set_sequence_number_for_group()  # as vLLM's side does: rank 0 sets it, the members read it
    return gloo, store


def broadcast_payload(group: Any, packed: Packed, backend: str) -> None:
    """Send the payload from rank 0 in `BROADCAST_SLICE_BYTES` slices, as the members receive it."""
    import torch

    nbytes = packed.manifest.total_bytes
    data = torch.frombuffer(packed.payload, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    for start in range(0, nbytes, BROADCAST_SLICE_BYTES):
        piece = data[start : start + BROADCAST_SLICE_BYTES]
        if backend == "nccl":
            staged = piece.to(f"cuda:{torch.cuda.current_device()}")
            group.broadcast(staged, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()
        else:
            options = torch.distributed.BroadcastOptions()
            options.rootRank = 0
            group.broadcast([piece], options).wait()
