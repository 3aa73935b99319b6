"""A broker short of room (issue 16, finding 5). Its memory ceiling is smaller than the versions (an 8B
model's 16 GB in a pod of a few GiB): versions past the ceiling are assembled in and served from files on the
volume, bit for bit, instead of being refused or taking the pod's memory. Its byte budget is full: the
trainer waits instead of crashing. Real gRPC on loopback, the real client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from cadence.broker.directory_store import SpillingStore
from cadence.broker.main import build
from cadence.broker.settings import BrokerSettings
from cadence.clients import BrokerClient
from cadence.errors import Overloaded
from cadence.net import free_port
from cadence.trainer.publishing import Publisher

MIB = 1 << 20


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(1024, 1024, generator=gen),
        "head.bf16": torch.randn(999, generator=gen).to(torch.bfloat16),
    }


def test_versions_larger_than_the_memory_ceiling_are_kept_on_the_volume_and_served(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    settings = BrokerSettings(
        host="127.0.0.1", grpc_port=free_port(), store="memory", retain=2, max_bytes=64 * MIB
    ).model_copy(update={"memory_bytes": 6 * MIB, "spill_dir": str(spill)})
    server, servicer = build(settings)
    store = servicer.store
    assert isinstance(store, SpillingStore)
    target = f"127.0.0.1:{server.start()}"
    try:
        with BrokerClient(target, "spill", keyframe_every=1) as client:  # every version in full: ~4 MiB each
            for version in range(1, 6):
                client.publish(state(version), version)
                assert store.in_memory() <= 6 * MIB, f"version {version}: {store.in_memory()} bytes in memory"
                for held in (version - 1, version):
                    if held >= 1:
                        got = client.fetch(held)
                        assert all(torch.equal(got[k].view(-1), v.view(-1)) for k, v in state(held).items())
            assert [v.version for v in store.versions("spill")] == [4, 5]
            on_volume = [s for run in store._runs.values() for s in run.values() if s.path is not None]
            assert on_volume, "no version went to the volume: the test did not pass the memory ceiling"
    finally:
        servicer.close()
        server.stop(0.5)
    assert not list(spill.iterdir()), "spilled files are unlinked once mapped: nothing is left behind"


def test_the_trainer_waits_out_a_full_broker_instead_of_crashing(tmp_path: Path) -> None:
    """retain 1, a budget of 2.5 versions: a fetch still reading version 1 after its eviction holds its bytes,
    so version 3 does not fit (`Overloaded`) until that fetch ends; the trainer's publisher waits, then
    publishes. Its client retries nothing, so the wait is the publisher's (the client's own 5 retries span
    ~6 s: they alone would outlast this 2 s fetch, but not a long one)."""
    settings = BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory", retain=1, max_bytes=10 * MIB)
    server, servicer = build(settings)
    target = f"127.0.0.1:{server.start()}"
    try:
        with BrokerClient(target, "full", keyframe_every=1) as client:
            client.publish(state(1), 1)
            reader = servicer.store.open("full", 1)  # a slow fetch of version 1
            client.publish(state(2), 2)  # version 1 is evicted but still read: its bytes stay held
            with pytest.raises(Overloaded):
                client.publish(state(3), 3)
            threading.Timer(2.0, reader.close).start()
            started = time.monotonic()
            with BrokerClient(target, "full", keyframe_every=1, retries=0) as impatient:  # the wait is the publisher's
                Publisher(impatient, threading.Event()).publish(state(3), 3)
            assert time.monotonic() - started >= 1.5
            assert client.latest().version == 3
    finally:
        servicer.close()
        server.stop(0.5)
