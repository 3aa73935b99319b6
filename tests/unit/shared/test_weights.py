"""Weights on the wire: bit-exact round trips and precise refusals of corrupt or inconsistent payloads."""

import copy

import pytest
import torch

from cadence import weights
from cadence.errors import IntegrityError, InvalidRequest


def state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(37, 11, generator=gen),
        "norm.weight": torch.randn(11, generator=gen).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(3, 3, generator=gen).half(),
    }


def assemble(packed: weights.Packed) -> bytearray:
    assembler = weights.Assembler(packed.manifest)
    for chunk in list(weights.iter_chunks(packed.manifest, packed.payload))[1:]:
        assembler.add(chunk.data, chunk.offset)
    return assembler.finish()


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("chunk_bytes", [7, 64, weights.CHUNK_BYTES])
def test_round_trip_is_bit_exact(chunk_bytes: int) -> None:
    original = state_dict()
    packed = weights.pack(original, run_id="r", version=3, chunk_bytes=chunk_bytes)
    restored = weights.unpack(packed.manifest, assemble(packed))
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        assert restored[name].shape == tensor.shape
        assert bits(restored[name]) == bits(tensor)


def test_chunks_never_exceed_the_limit() -> None:
    packed = weights.pack({"w": torch.zeros(3 * 1024 * 1024)}, run_id="r", version=1)
    sizes = [
        len(c.data) for c in weights.iter_chunks(packed.manifest, packed.payload) if c.WhichOneof("body") == "data"
    ]
    assert max(sizes) <= weights.CHUNK_BYTES
    assert sum(sizes) == 12 * 1024 * 1024


def test_a_small_payload_is_cut_into_several_chunks_so_hashing_overlaps_the_transfer() -> None:
    toy = weights.pack({"w": torch.zeros(534_144)}, run_id="r", version=1)  # the toy model's 2.1 MB
    assert weights.MIN_CHUNK_BYTES <= toy.manifest.chunk_size < weights.CHUNK_BYTES
    assert toy.manifest.chunk_size % 65536 == 0
    assert weights.num_chunks(toy.manifest) == weights.PIPELINE_CHUNKS - 1  # the last one is short
    weights.validate_manifest(toy.manifest)
    assert weights.chunk_size_for(40 * 1024 * 1024) == weights.CHUNK_BYTES  # large payloads: full chunks
    assert weights.chunk_size_for(10) == weights.MIN_CHUNK_BYTES  # tiny ones: one chunk, never below the floor


def test_corrupted_chunk_is_rejected_at_once_without_pipelining() -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    chunks = list(weights.iter_chunks(packed.manifest, packed.payload))[1:]
    assembler = weights.Assembler(packed.manifest, depth=0)
    bad = bytearray(chunks[0].data)
    bad[5] ^= 0xFF
    with pytest.raises(IntegrityError, match=r"chunk 0 .* failed sha256"):
        assembler.add(bytes(bad), chunks[0].offset)
    assert assembler.received == 0


def test_pipelined_verification_never_passes_a_corrupt_chunk_and_resumes_before_it() -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    chunks = list(weights.iter_chunks(packed.manifest, packed.payload))[1:]
    assert len(chunks) > 4
    assembler = weights.Assembler(packed.manifest, depth=3)
    bad = bytearray(chunks[2].data)
    bad[0] ^= 0x01
    sent = [*chunks[:2], type(chunks[2])(data=bytes(bad), offset=chunks[2].offset), *chunks[3:]]
    with pytest.raises(IntegrityError, match=r"chunk 2 .* failed sha256"):
        for chunk in sent:
            assembler.add(chunk.data, chunk.offset)
            assert assembler.verified <= chunks[2].offset
        assembler.finish()
    assert assembler.received == chunks[2].offset
    for chunk in chunks[2:]:
        assembler.add(chunk.data, chunk.offset)
    assert bytes(assembler.finish()) == bytes(packed.payload)


def test_out_of_order_and_incomplete_are_rejected() -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    chunks = list(weights.iter_chunks(packed.manifest, packed.payload))[1:]
    assembler = weights.Assembler(packed.manifest)
    with pytest.raises(IntegrityError, match="out of order"):
        assembler.add(chunks[1].data, chunks[1].offset)
    assembler.add(chunks[0].data, chunks[0].offset)
    with pytest.raises(IntegrityError, match="incomplete"):
        assembler.finish()


def test_whole_digest_binds_the_chunk_digests() -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    manifest = copy.deepcopy(packed.manifest)
    manifest.chunk_sha256[0], manifest.chunk_sha256[1] = manifest.chunk_sha256[1], manifest.chunk_sha256[0]
    with pytest.raises(InvalidRequest, match="not the sha256 of its chunk digests"):
        weights.Assembler(manifest)


def test_resume_from_a_chunk_boundary() -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    first = weights.Assembler(packed.manifest)
    chunks = list(weights.iter_chunks(packed.manifest, packed.payload))[1:]
    first.add(chunks[0].data, chunks[0].offset)
    resumed = weights.Assembler(packed.manifest, offset=first.received, buffer=first.buffer)
    for chunk in list(weights.iter_chunks(packed.manifest, packed.payload, offset=first.received))[1:]:
        resumed.add(chunk.data, chunk.offset)
    assert bytes(resumed.finish()) == bytes(packed.payload)
    with pytest.raises(InvalidRequest, match="not a chunk boundary"):
        next(iter(list(weights.iter_chunks(packed.manifest, packed.payload, offset=3))))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m.tensors[0], "dtype", "F7"), "unknown dtype 'F7'"),
        (lambda m: m.tensors[0].shape.append(2), "does not match shape"),
        (lambda m: setattr(m.tensors[1], "offset", 0), "lie back to back"),
        (lambda m: setattr(m, "total_bytes", m.total_bytes + 1), "tensors span"),
        (lambda m: m.chunk_sha256.pop(), "chunk digests"),
        (lambda m: setattr(m, "sha256", "xyz"), "not a lowercase hex sha256"),
        (lambda m: setattr(m, "chunk_size", 0), "chunk_size 0"),
        (lambda m: setattr(m, "version", -1), "versions start at 0"),
    ],
)
def test_inconsistent_manifests_are_refused(mutate, message: str) -> None:
    packed = weights.pack(state_dict(), run_id="r", version=1, chunk_bytes=64)
    manifest = copy.deepcopy(packed.manifest)
    mutate(manifest)
    with pytest.raises(InvalidRequest, match=message):
        weights.validate_manifest(manifest)
