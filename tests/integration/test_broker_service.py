"""The weight-sync broker over real gRPC on loopback: round trips bit for bit, concurrent fetchers, retention,
watch order, cancelled publishes and fetches, bad manifests. Process-level faults: test_broker_faults.py."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from cadence import errors
from cadence.broker.main import build
from cadence.broker.server import BrokerServicer
from cadence.broker.settings import BrokerSettings
from cadence.clients import BrokerClient
from cadence.clients.broker import make_transport
from cadence.grpc import ServiceServer, channel
from cadence.net import free_port
from cadence.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from cadence.weights import Assembler, iter_chunks, pack, unpack

torch.set_num_threads(1)
RUN = "run-t"


@dataclass
class Broker:
    target: str
    server: ServiceServer
    servicer: BrokerServicer
    stub: broker_pb2_grpc.BrokerStub

    def client(self, **options: float) -> BrokerClient:
        return BrokerClient(self.target, RUN, **options)


@pytest.fixture
def broker() -> Iterator[Broker]:
    server, servicer = build(BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory", retain=2))
    port = server.start()
    target = f"127.0.0.1:{port}"
    with channel(target) as chan:
        yield Broker(target, server, servicer, broker_pb2_grpc.BrokerStub(chan))
    servicer.close()
    server.stop(0.5)


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 over several 4 MiB chunks, bf16 with special values, odd shapes, an empty and 1-element tensors."""
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38])
    return {
        "embed.weight": torch.randn(1100, 1000, generator=gen),
        "layers.0.attn.bf16": torch.cat([torch.randn(4093, generator=gen), special]).to(torch.bfloat16),
        "layers.0.mlp.odd": torch.randn(3, 5, 7, generator=gen),
        "layers.0.empty": torch.empty(0, 7),
        "layers.0.one": torch.randn(1, generator=gen).to(torch.bfloat16),
        "layers.0.scalar": torch.tensor(2.5),
        "positions": torch.arange(17, dtype=torch.int64),
    }


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


def test_round_trip_is_bit_exact_and_streams_tensors_in_order(broker: Broker) -> None:
    state = sample_state()
    with broker.client() as client:
        assert client.latest() is None
        info = client.publish(state, version=0)
        assert (info.run_id, info.version, info.num_tensors) == (RUN, 0, len(state))
        assert info.total_bytes > 4 * 1024 * 1024  # more than one chunk
        assert client.latest() == info
        assert_bit_exact(client.fetch(0), state)
        assert [name for name, _ in client.fetch_tensors(0)] == list(state)


def test_four_concurrent_fetchers_all_get_the_exact_weights(broker: Broker) -> None:
    state = sample_state(1)
    with broker.client() as client:
        info = client.publish(state, version=1)
    before = counter("cadence_broker_bytes_out")
    results: list[dict[str, torch.Tensor]] = []

    def fetch() -> None:
        with broker.client() as client:
            results.append(client.fetch(1))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    for result in results:
        assert_bit_exact(result, state)
    assert counter("cadence_broker_bytes_out") - before == 4 * info.total_bytes
    assert broker.stub.Status(broker_pb2.BrokerStatusRequest()).active_fetches == 0


def test_retention_evicts_old_versions_but_finishes_a_fetch_in_flight(broker: Broker) -> None:
    # Large enough that flow control holds the server's stream open until the client reads on.
    first = {"big": torch.randn(12_000_000, generator=torch.Generator().manual_seed(1))}
    with broker.client() as client:
        client.publish(first, version=1)
        stream = broker.stub.Fetch(broker_pb2.FetchRequest(run_id=RUN, version=1))
        assembler = Assembler(next(stream).manifest)
        chunk = next(stream)
        assembler.add(chunk.data, chunk.offset)
        client.publish(sample_state(2), version=2)
        client.publish(sample_state(3), version=3)  # retain=2: version 1 is evicted but still being read
        status = broker.stub.Status(broker_pb2.BrokerStatusRequest())
        assert [v.version for v in status.versions] == [2, 3] and status.active_fetches == 1
        assert status.stored_bytes == 48_000_000 + 2 * status.versions[0].total_bytes
        for chunk in stream:
            assembler.add(chunk.data, chunk.offset)
        assert_bit_exact(unpack(assembler.manifest, assembler.finish()), first)
        with pytest.raises(errors.VersionNotFound, match=r"version 1 .* not held .*available: \[2, 3\]"):
            client.fetch(1)
        status = broker.stub.Status(broker_pb2.BrokerStatusRequest())
        assert status.active_fetches == 0 and status.stored_bytes == 2 * status.versions[0].total_bytes


def test_watch_late_watcher_gets_latest_then_versions_in_order(broker: Broker) -> None:
    small = {"w": torch.ones(4)}
    with broker.client() as client:
        client.publish(small, version=1)
        client.publish(small, version=2)
        watch = client.watch(after_version=-1)
        assert next(watch).version == 2
        client.publish(small, version=3)
        assert next(watch).version == 3
        client.publish(small, version=4)
        client.publish(small, version=5)
        assert [next(watch).version, next(watch).version] == [4, 5]
        watch.close()
        follower = broker.client()
        followed: list[int] = []
        thread = threading.Thread(target=lambda: followed.extend(i.version for i in follower.watch(-1)))
        thread.start()
        deadline = time.monotonic() + 5
        while not followed and time.monotonic() < deadline:
            time.sleep(0.01)
        follower.close()  # ends the watch blocked in another thread, without an error
        thread.join(5)
        assert not thread.is_alive() and followed == [5]
        raw = broker.stub.Watch(broker_pb2.WatchRequest(run_id=RUN, after_version=4))
        assert next(raw).version == 5  # the watch is open on the server
        ended = threading.Event()
        threading.Thread(target=lambda: (list(raw), ended.set()), daemon=True).start()
        broker.servicer.close()  # what SIGTERM does: watchers end cleanly
        assert ended.wait(5)
        assert raw.code() == grpc.StatusCode.OK


def test_cancelled_fetch_resumes_from_the_last_complete_chunk(broker: Broker) -> None:
    state = sample_state(4)
    with broker.client() as client:
        client.publish(state, version=4)
    before = counter("cadence_broker_fetch_resumes")
    stream = broker.stub.Fetch(broker_pb2.FetchRequest(run_id=RUN, version=4))
    assembler = Assembler(next(stream).manifest)
    chunk = next(stream)  # one of two chunks, then the client walks away
    assembler.add(chunk.data, chunk.offset)
    stream.cancel()
    resumed = broker.stub.Fetch(broker_pb2.FetchRequest(run_id=RUN, version=4, offset=assembler.received))
    assert next(resumed).manifest == assembler.manifest
    for chunk in resumed:
        assembler.add(chunk.data, chunk.offset)
    assert_bit_exact(unpack(assembler.manifest, assembler.finish()), state)
    assert counter("cadence_broker_fetch_resumes") - before == 1
    with pytest.raises(grpc.RpcError) as caught:
        list(broker.stub.Fetch(broker_pb2.FetchRequest(run_id=RUN, version=4, offset=12345)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk boundary" in caught.value.details()


def test_publisher_cancelled_midway_leaves_nothing_visible(broker: Broker) -> None:
    packed = pack(sample_state(5), run_id=RUN, version=5)

    def half_then_crash() -> Iterator[common_pb2.WeightChunk]:
        chunks = iter_chunks(packed.manifest, packed.payload)
        yield next(chunks)
        yield next(chunks)
        raise RuntimeError("publisher crashed")

    with pytest.raises(grpc.RpcError):
        broker.stub.Publish(half_then_crash())
    status = broker.stub.Status(broker_pb2.BrokerStatusRequest())
    assert list(status.versions) == [] and status.stored_bytes == 0
    with broker.client() as client:
        assert client.latest() is None
        assert client.publish_packed(packed).version == 5  # no leftover reservation or half version


def _corrupt(kind: str) -> list[common_pb2.WeightChunk]:
    packed = pack(sample_state(6), run_id=RUN, version=6)
    messages = list(iter_chunks(packed.manifest, packed.payload))
    manifest = messages[0].manifest
    if kind == "chunk digest":
        messages[2] = common_pb2.WeightChunk(data=b"\x00" + messages[2].data[1:], offset=messages[2].offset)
    elif kind == "whole digest":
        manifest.sha256 = hashlib.sha256(b"something else").hexdigest()
    elif kind == "shape/bytes":
        manifest.tensors[2].shape[:] = [3, 5, 8]
    elif kind == "dtype":
        manifest.tensors[1].dtype = "F8_E4M3"
    elif kind == "no manifest":
        messages = messages[1:]
    return messages


BAD = [
    ("chunk digest", grpc.StatusCode.DATA_LOSS, "chunk 1 .* failed sha256 verification"),
    ("whole digest", grpc.StatusCode.INVALID_ARGUMENT, "not the sha256 of its chunk digests"),
    ("shape/bytes", grpc.StatusCode.INVALID_ARGUMENT, "does not match shape \\[3, 5, 8\\]"),
    ("dtype", grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype 'F8_E4M3'"),
    ("no manifest", grpc.StatusCode.INVALID_ARGUMENT, "starts with the manifest"),
]


def test_bad_manifests_get_clear_errors_and_the_broker_keeps_serving(broker: Broker) -> None:
    for kind, code, message in BAD:
        with pytest.raises(grpc.RpcError) as caught:
            broker.stub.Publish(iter(_corrupt(kind)))
        assert caught.value.code() == code, kind
        assert re.search(message, caught.value.details() or ""), kind
    assert broker.stub.Status(broker_pb2.BrokerStatusRequest()).stored_bytes == 0
    state = sample_state(6)
    with broker.client() as client:
        assert client.publish(state, version=6).version == 6
        assert_bit_exact(client.fetch(6), state)


def test_a_damaged_chunk_of_a_small_version_is_refused_while_later_chunks_stream(broker: Broker) -> None:
    """A toy-sized version goes in several chunks (`chunk_size_for`) and the broker hashes each while the
    next arrives: a damaged middle chunk is still refused, and nothing of the version is kept."""
    packed = pack({"w": torch.randn(534_144)}, run_id=RUN, version=1)
    messages = list(iter_chunks(packed.manifest, packed.payload))
    assert len(messages) > 4
    damaged = messages[3]
    messages[3] = common_pb2.WeightChunk(data=damaged.data[:-1] + b"\x01", offset=damaged.offset)
    with pytest.raises(grpc.RpcError) as caught:
        broker.stub.Publish(iter(messages))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert re.search("chunk 2 .* failed sha256 verification", caught.value.details() or "")
    assert broker.stub.Status(broker_pb2.BrokerStatusRequest()).stored_bytes == 0
    with broker.client() as client:
        assert client.latest() is None


def test_conflicts_and_idempotent_republish(broker: Broker) -> None:
    small = {"w": torch.arange(6, dtype=torch.float32)}
    with broker.client() as client:
        first = client.publish(small, version=2)
        assert client.publish(small, version=2) == first  # same digest: accepted, nothing re-stored
        with pytest.raises(errors.Conflict, match="already published with another payload"):
            client.publish({"w": torch.zeros(6)}, version=2)
        with pytest.raises(errors.Conflict, match="not newer than the latest, 2"):
            client.publish(small, version=1)
        with pytest.raises(errors.VersionNotFound, match=r"available: \[2\]"):
            client.fetch(7)
    with BrokerClient(broker.target, "bad/run") as bad, pytest.raises(errors.InvalidRequest, match="run id"):
        bad.latest()


def test_make_transport_names_the_valid_types(broker: Broker) -> None:
    with make_transport("broker", broker.target, RUN) as transport:
        assert transport.latest() is None
    with pytest.raises(errors.ConfigError, match="valid types: broker"):
        make_transport("nccl", broker.target, RUN)
