"""Delta versions end to end: a real tiny model trained with real AdamW steps, published in bf16 through a real
broker (in process and as `cadence serve broker` with a directory store) on loopback.

A fetcher one version behind takes the delta; a late joiner, a restarted replica and a restarted broker reach
the current version; a delta damaged on the way is refused and fetched again; a rebuild that does not match
the trainer's digests is never loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cadence import weights_delta
from cadence.broker.main import build
from cadence.broker.settings import BrokerSettings
from cadence.clients import BrokerClient
from cadence.net import free_port
from cadence.weights import pack

from .test_broker_faults import BrokerProcess, CuttingProxy, bit_exact
from .test_broker_service import counter

torch.set_num_threads(1)
RUN = "run-d"


@pytest.fixture(scope="module")
def versions(untrained_tiny_model_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The tiny model's weights in bf16 before and after each of 4 AdamW steps (fp32 master weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-8, weight_decay=0.0)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    out = [_bf16(model)]
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(_bf16(model))
    return out


def _bf16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to(torch.bfloat16).clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def target() -> Iterator[str]:
    server, servicer = build(BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory", retain=2))
    port = server.start()
    yield f"127.0.0.1:{port}"
    servicer.close()
    server.stop(0.5)


def sha256(state: dict[str, torch.Tensor]) -> str:
    return pack(state, run_id=RUN, version=0).manifest.sha256


def publish_all(target: str, versions: list[dict[str, torch.Tensor]], **options: int) -> list[int]:
    """Publish versions 1.. and return the bytes the broker stores for each as a delta (0: keyframe)."""
    with BrokerClient(target, RUN, **options) as trainer:
        return [trainer.publish(state, version).delta_bytes for version, state in enumerate(versions, start=1)]


def test_a_fetcher_one_version_behind_takes_the_delta(target: str, versions: list[dict[str, torch.Tensor]]) -> None:
    stored = publish_all(target, versions[:3])
    full = pack(versions[0], run_id=RUN, version=1).manifest.total_bytes
    assert stored[0] == 0 and all(0 < size < full for size in stored[1:])
    with BrokerClient(target, RUN, apply_deltas=True) as replica:
        assert bit_exact(replica.fetch(1), versions[0])
        for version in (2, 3):
            before_bytes, before_deltas = counter("cadence_broker_bytes_out"), counter("cadence_broker_delta_fetches")
            got = replica.fetch(version)
            assert counter("cadence_broker_bytes_out") - before_bytes == stored[version - 1]  # only the delta
            assert counter("cadence_broker_delta_fetches") - before_deltas == 1
            assert bit_exact(got, versions[version - 1]) and sha256(got) == sha256(versions[version - 1])


def test_a_late_joiner_gets_the_broker_rebuild_of_any_held_version(
    target: str, versions: list[dict[str, torch.Tensor]]
) -> None:
    publish_all(target, versions)  # 1 keyframe + 4 deltas: every version back to the keyframe stays held
    with BrokerClient(target, RUN) as late:
        assert [info.version for info in late.status().versions] == [1, 2, 3, 4, 5]
        for version in (5, 3):  # the head, then one rebuilt on demand from the keyframe
            assert bit_exact(late.fetch(version), versions[version - 1])


def test_keyframes_come_periodically_and_bound_what_is_held(
    target: str, versions: list[dict[str, torch.Tensor]]
) -> None:
    assert publish_all(target, versions, keyframe_every=2)[::2] == [0, 0, 0]  # versions 1, 3, 5
    with BrokerClient(target, RUN) as client:
        assert [info.version for info in client.status().versions] == [3, 4, 5]  # retain=2, and 4 builds on 3
        assert bit_exact(client.fetch(4), versions[3])


def test_a_version_where_most_bytes_changed_goes_as_a_keyframe(
    target: str, versions: list[dict[str, torch.Tensor]]
) -> None:
    gen = torch.Generator().manual_seed(1)
    noisy = {name: (t.float() + torch.randn(t.shape, generator=gen)).bfloat16() for name, t in versions[1].items()}
    stored = publish_all(target, [versions[0], versions[1], noisy])
    assert stored[1] > 0 and stored[2] == 0
    with BrokerClient(target, RUN) as client:
        assert bit_exact(client.fetch(3), noisy)


def test_a_delta_the_broker_cannot_apply_goes_as_a_keyframe(
    target: str, versions: list[dict[str, torch.Tensor]]
) -> None:
    with BrokerClient(target, RUN) as trainer, BrokerClient(target, RUN) as other:
        trainer.publish(versions[0], 1)
        other.publish(versions[2], 2)  # the broker's newest is no longer what `trainer` sent last
        assert trainer.publish(versions[1], 3).delta_bytes == 0
        assert bit_exact(trainer.fetch(3), versions[1])


def test_a_delta_damaged_on_the_way_is_refused_and_fetched_again(versions: list[dict[str, torch.Tensor]]) -> None:
    broker = BrokerProcess("memory")
    try:
        stored = publish_all(broker.target, versions[:2])
        full = pack(versions[0], run_id=RUN, version=1).manifest.total_bytes
        # The replica's one connection carries version 1 in full, then the delta: damage the delta's middle.
        proxy = CuttingProxy(broker.port, cut_after=full + 2048 + stored[1] // 2, direction="down", flip=True)
        with BrokerClient(proxy.address, RUN, apply_deltas=True, backoff=0.05) as replica:
            assert bit_exact(replica.fetch(1), versions[0])
            assert bit_exact(replica.fetch(2), versions[1])
        proxy.close()
        assert broker.metric("cadence_broker_delta_fetches_total") == 2  # the damaged delta, then a good one
        assert broker.metric("cadence_broker_bytes_out_total") == full + 2 * stored[1]  # never the full version
    finally:
        broker.proc.kill()
        broker.proc.wait(5)


def test_a_rebuild_that_differs_from_the_trainer_is_never_loaded(
    target: str, versions: list[dict[str, torch.Tensor]]
) -> None:
    publish_all(target, versions[:2])
    with BrokerClient(target, RUN, apply_deltas=True) as replica:
        first = replica.fetch(1)
        first[next(iter(first))].view(-1)[7] += 1  # the held base drifts from version 1 (views share its bytes)
        before = counter("cadence_broker_delta_fetches")
        got = replica.fetch(2)
        assert counter("cadence_broker_delta_fetches") - before == 1  # the delta was tried, refused after rebuild
        assert bit_exact(got, versions[1]) and sha256(got) == sha256(versions[1])  # then fetched in full


def test_a_restarted_broker_and_a_restarted_replica_reach_the_current_version(
    tmp_path: Path, versions: list[dict[str, torch.Tensor]]
) -> None:
    store = str(tmp_path / "weights")
    broker = BrokerProcess(store)
    stored = publish_all(broker.target, versions[:3])
    assert broker.terminate() == 0
    broker = BrokerProcess(store)  # reloads keyframe 1 and deltas 2, 3, rebuilds 3 and checks it
    try:
        with BrokerClient(broker.target, RUN, apply_deltas=True) as replica:  # a replica that lost its state
            latest = replica.latest()
            assert latest is not None and (latest.version, latest.delta_bytes) == (3, stored[2])
            assert bit_exact(replica.fetch(3), versions[2])
            with BrokerClient(broker.target, RUN) as trainer:
                trainer.publish(versions[2], 3)  # an idempotent replay after a trainer restart
                assert trainer.publish(versions[3], 4).delta_bytes > 0  # a delta against the rebuilt head
            assert bit_exact(replica.fetch(4), versions[3])
            latest = replica.latest()
            assert latest is not None and latest.sha256 == sha256(versions[3])
    finally:
        broker.proc.kill()
        broker.proc.wait(5)


def test_weights_delta_is_what_the_broker_stores(target: str, versions: list[dict[str, torch.Tensor]]) -> None:
    """The stored size is the encoding's size for the trainer's two payloads (no hidden re-encoding)."""
    stored = publish_all(target, versions[:2])
    a, b = (pack(state, run_id=RUN, version=v) for v, state in enumerate(versions[:2], start=1))
    assert stored[1] == len(weights_delta.encode(a.payload, b.payload))
