"""Delta versions: a delta rebuilds its target bit for bit, in place, and malformed deltas are refused."""

import pytest
import torch

from cadence import weights, weights_delta
from cadence.errors import IntegrityError, InvalidRequest


def versions(changed: float = 0.01) -> tuple[weights.Packed, weights.Packed]:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(700, 300, generator=gen).bfloat16(), "b.bias": torch.randn(5, generator=gen)}
    target = {name: tensor.clone() for name, tensor in base.items()}
    mask = torch.rand(target["a.weight"].shape, generator=gen) < changed
    target["a.weight"][mask] = target["a.weight"][mask] * 1.01
    target["b.bias"][0] += 1
    pack = weights.pack
    return pack(base, run_id="r", version=1, chunk_bytes=65536), pack(target, run_id="r", version=2, chunk_bytes=65536)


def test_a_delta_rebuilds_the_target_in_place_and_back() -> None:
    base, target = versions()
    delta = weights_delta.encode(base.payload, target.payload, block_bytes=100_000)
    assert len(delta) < 0.2 * len(target.payload)
    payload = bytearray(base.payload)
    weights_delta.apply(payload, delta)
    assert payload == bytes(target.payload)
    weights.verify_payload(target.manifest, payload)
    weights_delta.apply(payload, delta)  # XOR is its own inverse
    assert payload == bytes(base.payload)


def test_an_unchanged_version_is_a_few_bytes() -> None:
    base, _ = versions()
    assert len(weights_delta.encode(base.payload, base.payload)) < 64


def test_damaged_or_foreign_deltas_are_refused() -> None:
    base, target = versions()
    delta = weights_delta.encode(base.payload, target.payload, block_bytes=100_000)
    with pytest.raises(IntegrityError, match="header"):
        weights_delta.apply(bytearray(base.payload), b"XXXX" + delta[4:])
    with pytest.raises(IntegrityError, match="span"):
        weights_delta.apply(bytearray(base.payload), delta[:-1])
    with pytest.raises(IntegrityError, match="base holds"):
        weights_delta.apply(bytearray(len(base.payload) + 2), delta)
    damaged = bytearray(delta)
    damaged[-20] ^= 0xFF
    with pytest.raises(IntegrityError):
        payload = bytearray(base.payload)
        weights_delta.apply(payload, bytes(damaged))
        weights.verify_payload(target.manifest, payload)  # zstd's checksum or the digests catch it


def test_the_manifest_describes_the_full_version_and_the_delta_data() -> None:
    base, target = versions()
    delta = weights_delta.encode(base.payload, target.payload)
    digests = weights.chunk_digests(delta, target.manifest.chunk_size)
    described = weights_delta.describe(target.manifest, base.manifest, delta, digests)
    assert described.sha256 == target.manifest.sha256 and weights_delta.is_delta(described)
    assert described.delta.base_version == 1 and described.delta.base_sha256 == base.manifest.sha256
    assert weights_delta.full(described) == target.manifest
    carrier = weights_delta.transport(described)
    weights.validate_manifest(carrier)
    weights.verify_payload(carrier, delta)


def test_a_delta_needs_one_layout() -> None:
    base, _ = versions()
    other = weights.pack({"a.weight": torch.zeros(3)}, run_id="r", version=3)
    with pytest.raises(InvalidRequest, match="keyframe"):
        weights_delta.describe(other.manifest, base.manifest, b"", [])
    with pytest.raises(InvalidRequest, match="one layout"):
        weights_delta.encode(base.payload, other.payload)


def test_a_delta_is_made_only_when_few_bytes_changed() -> None:
    base, target = versions(changed=0.01)
    assert 0 < weights_delta.changed_share(base.payload, target.payload, every=1) < 0.05
    made = weights_delta.against(base, target)
    assert made is not None and weights_delta.is_delta(made.manifest)
    assert made.manifest.sha256 == target.manifest.sha256  # the manifest still names the full version
    _, dense = versions(changed=0.9)
    assert weights_delta.changed_share(base.payload, dense.payload, every=1) > weights_delta.MAX_CHANGED
    assert weights_delta.against(base, dense) is None
