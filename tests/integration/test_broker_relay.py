"""Relay fan-out end to end: a real broker and real replicas (`BrokerClient` with a relay server), on loopback.

Replicas that fetch together stream through one another and the broker's egress is one copy; a relayed chunk
damaged on the way is refused and fetched again; a replica killed mid-relay (a real process, SIGKILL) is
routed around; deltas relay too, and a late joiner and a restarted replica reach the trainer's exact bytes,
in full from replicas that rebuilt them from the delta (the broker sends one delta per version, nothing more).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from cadence.clients import BrokerClient
from cadence.clients.relay import Relay, RelayServer, RelaySource, start_relay
from cadence.net import free_port
from cadence.weights import pack

from .test_broker_deltas import versions  # noqa: F401  (the fixture: a tiny model's bf16 weights, trained)
from .test_broker_faults import CuttingProxy, bit_exact
from .test_broker_service import counter

torch.set_num_threads(1)
RUN = "run-r"
CHUNK = 256 * 1024
HELPER = Path(__file__).with_name("relay_replica.py")


def random_state(mib: int, seed: int) -> dict[str, torch.Tensor]:
    """`mib` MiB of fp32 in 1 MiB tensors."""
    gen = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(256, 1024, generator=gen) for i in range(mib)}


def publish(target: str, state: dict[str, torch.Tensor], version: int) -> int:
    """Publish in full, in 256 KiB chunks (many chunks to relay); returns the payload size."""
    with BrokerClient(target, RUN) as trainer:
        return trainer.publish_packed(pack(state, run_id=RUN, version=version, chunk_bytes=CHUNK)).total_bytes


def egress(target: str) -> int:
    with BrokerClient(target, RUN) as client:
        return client.status().bytes_out


def sha256(state: dict[str, torch.Tensor]) -> str:
    return pack(state, run_id=RUN, version=0).manifest.sha256


@contextmanager
def replica(target: str, relay: Relay | None = None) -> Iterator[BrokerClient]:
    """A replica's weight client: it relays what it fetches (keeping the last version, as inference does)."""
    relay = relay or start_relay("127.0.0.1", 0)
    client = BrokerClient(target, RUN, relay=relay, apply_deltas=True)
    try:
        yield client
    finally:
        client.close()
        assert relay.server is not None
        relay.server.stop(0)


def fetch_together(clients: list[BrokerClient], version: int) -> list[dict[str, torch.Tensor]]:
    """Each client fetches `version` in its own thread, all at once; the tensors are copied out."""
    got: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def fetch(index: int) -> None:
        try:
            got[index] = {name: tensor.clone() for name, tensor in clients[index].fetch_tensors(version)}
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return [got[i] for i in range(len(clients))]


def test_three_replicas_fetch_through_one_another_and_the_broker_sends_one_copy(broker: str) -> None:
    state = random_state(8, seed=0)
    size = publish(broker, state, 1)
    before, relayed = egress(broker), counter("cadence_relay_bytes_out")
    with ExitStack() as stack:
        clients = [stack.enter_context(replica(broker)) for _ in range(3)]
        got = fetch_together(clients, 1)
        assert clients[0].status().relays == 3
    assert all(bit_exact(g, state) for g in got)
    assert egress(broker) - before <= 1.2 * size  # the goal; a chain broker → A → B → C sends exactly one
    assert counter("cadence_relay_bytes_out") - relayed >= 1.8 * size


def test_a_relayed_chunk_damaged_in_flight_is_refused_and_fetched_again(
    broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = random_state(8, seed=1)
    size = publish(broker, state, 1)
    port = free_port()
    proxy = CuttingProxy(port, cut_after=3 << 20, direction="down", flip=True)  # flips one byte of A's replies
    server = RelayServer(RelaySource(), "127.0.0.1", port, advertise=proxy.address)
    server.start()
    try:
        with replica(broker, Relay(server)) as a, replica(broker) as b:
            assert bit_exact(a.fetch(1), state)  # from the broker
            before, failovers = egress(broker), counter("cadence_relay_failovers")
            relayed = counter("cadence_relay_bytes_in")
            with caplog.at_level(logging.WARNING, logger="cadence.clients.relay"):
                assert bit_exact(b.fetch(1), state)  # from A through the proxy, then the broker
    finally:
        proxy.close()
    assert counter("cadence_relay_failovers") - failovers == 1
    assert any("sha256" in getattr(record, "why", "") for record in caplog.records)
    received = counter("cadence_relay_bytes_in") - relayed
    kept = size - (egress(broker) - before)  # the broker sent the rest, from the refused chunk on
    assert kept % CHUNK == 0 and 2 << 20 <= kept <= received < size


def test_a_replica_killed_mid_relay_is_routed_around(broker: str) -> None:
    state = random_state(64, seed=2)
    size = publish(broker, state, 1)
    helper = subprocess.Popen([sys.executable, str(HELPER), broker, RUN, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout is not None
        assert helper.stdout.readline().strip(), "the relay replica did not fetch its version"
        before, relayed = egress(broker), counter("cadence_relay_bytes_in")
        with replica(broker) as b:
            tensors = b.fetch_tensors(1)
            first = next(tensors)  # streaming from the helper, which holds the whole version
            os.kill(helper.pid, signal.SIGKILL)
            helper.wait(10)
            got = dict([first, *tensors])
            assert bit_exact(got, state)
            from_helper = counter("cadence_relay_bytes_in") - relayed
            assert 0 < from_helper < size and egress(broker) - before == size - from_helper
            with replica(broker) as c:  # a replica after the kill is routed to B, not to the dead one
                settled = egress(broker)
                assert bit_exact(c.fetch(1), state)
                assert egress(broker) == settled
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(10)


def test_deltas_relay_and_late_joiners_and_restarted_replicas_reach_the_trainers_bytes(
    broker: str,
    versions: list[dict[str, torch.Tensor]],  # noqa: F811
) -> None:
    with ExitStack() as stack:
        trainer = stack.enter_context(BrokerClient(broker, RUN))  # publishes deltas against its last version
        a, b = stack.enter_context(replica(broker)), stack.enter_context(replica(broker))
        trainer.publish(versions[0], 1)
        assert all(sha256(g) == sha256(versions[0]) for g in fetch_together([a, b], 1))
        delta = trainer.publish(versions[1], 2).delta_bytes
        assert delta > 0
        before = egress(broker)
        assert all(sha256(g) == sha256(versions[1]) for g in fetch_together([a, b], 2))
        assert egress(broker) - before == delta  # one copy of the delta: B took it from A
        late = stack.enter_context(replica(broker))  # holds nothing: takes version 2 in full from A or B
        assert sha256(late.fetch(2)) == sha256(versions[1])  # which rebuilt it from the delta
        assert egress(broker) - before == delta
        b.close()  # B restarts: a fresh client and relay that hold nothing
        assert b.relay is not None and b.relay.server is not None
        b.relay.server.stop(0)
        restarted = stack.enter_context(replica(broker))
        delta = trainer.publish(versions[2], 3).delta_bytes
        before = egress(broker)
        assert all(sha256(g) == sha256(versions[2]) for g in fetch_together([a, late], 3))
        assert sha256(restarted.fetch(3)) == sha256(versions[2])  # in full, relayed
        assert egress(broker) - before == delta


def test_a_replica_without_a_relay_address_fetches_from_relays_and_a_broker_without_routes_serves_alone(
    broker: str,
) -> None:
    state = random_state(4, seed=3)
    publish(broker, state, 1)
    with replica(broker) as a:
        assert bit_exact(a.fetch(1), state)
        before = egress(broker)
        with BrokerClient(broker, RUN, relay=Relay()) as unreachable:  # no server: takes routes, serves nobody
            assert bit_exact(unreachable.fetch(1), state)
        assert egress(broker) == before  # it took the version from A
        assert a.status().relays == 1
        assert a.relay is not None
        with BrokerClient(a.relay.address, RUN, relay=Relay()) as old:  # a relay answers Fetch but not Route
            assert bit_exact(old.fetch(1), state)
            assert old.relay is None  # so the client fetches from that broker alone from then on
