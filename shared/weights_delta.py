"""Delta versions: a payload as the XOR against the version before it, compressed with zstd, block by block.

Chosen by measurement (`bench/sync.py`): with weights sent in bf16, a step at a small learning rate changes a
few per mille of the values, and those by an ulp or two, so the XOR is almost all zero bytes and zstd turns it
into well under 1 % of the payload; at a large learning rate most values change and it still saves about a
third, where sparse indices + values would be larger than the payload itself. XOR is its own inverse, so a
delta turns the base into the target *in place* (no second full copy) and back again.

Format (`ENCODING`): magic, block size, total size, block count, one u32 frame length per block, then the zstd
frames; a block whose XOR is all zero has length 0 and no frame. Blocks are compressed and applied in
parallel threads (zstd releases the GIL) and apply one at a time, so decoding needs one block of scratch.

Pure byte logic, numpy and zstandard only: the broker, which never loads torch, reconstructs versions too.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

from cadence.errors import IntegrityError, InvalidRequest
from cadence.v1 import common_pb2
from cadence.weights import Packed, chunk_digests, payload_digest

ENCODING = "xor-zstd"
BLOCK_BYTES = 4 * 1024 * 1024
LEVEL = 1  # level 3 saves a few more per cent of the delta at twice the encode time (bench/sync.py)
THREADS = 2
MAX_CHANGED = 0.2  # above this share of changed bytes a delta costs more to encode than it saves: keyframe
SAMPLE_BYTES = 64 * 1024
SAMPLE_EVERY = 16  # `changed_share` looks at one window of SAMPLE_BYTES in this many
_MAGIC = b"CDX1"
_HEAD = struct.Struct("<4sIQI")  # magic, block bytes, total bytes, blocks
Buffer = bytes | bytearray | memoryview


def encode(base: Buffer, target: Buffer, *, level: int = LEVEL, block_bytes: int = BLOCK_BYTES) -> bytes:
    """The delta that turns `base` into `target` (two payloads of one layout, the same length)."""
    if len(base) != len(target):
        raise InvalidRequest(
            f"a delta needs payloads of one layout; the base has {len(base)} bytes, the target {len(target)}"
        )
    total = len(target)
    starts = range(0, total, block_bytes)

    def frame(start: int) -> bytes:
        end = min(start + block_bytes, total)
        diff = np.bitwise_xor(_u8(base, start, end), _u8(target, start, end))
        if not diff.any():
            return b""
        return zstandard.ZstdCompressor(level=level).compress(diff.data)

    with ThreadPoolExecutor(THREADS, thread_name_prefix="delta") as pool:
        frames = list(pool.map(frame, starts))
    head = _HEAD.pack(_MAGIC, block_bytes, total, len(frames))
    return b"".join([head, struct.pack(f"<{len(frames)}I", *map(len, frames)), *frames])


def apply(payload: bytearray | memoryview, delta: Buffer) -> None:
    """Turn `payload` (the base, writable) into the version `delta` encodes, in place.

    Raises `IntegrityError` on a delta that is malformed or made for another size; the caller still checks
    the result against the target's digests (a delta against another base decodes without error).
    """
    block_bytes, total, spans = _parse(delta, len(payload))
    view = memoryview(delta)

    def xor_into(item: tuple[int, tuple[int, int]]) -> None:
        index, (start, end) = item
        if start == end:
            return
        block = index * block_bytes
        size = min(block_bytes, total - block)
        try:
            diff = zstandard.ZstdDecompressor().decompress(view[start:end], max_output_size=size)
        except zstandard.ZstdError as error:
            raise IntegrityError(
                f"delta block {index} does not decompress: {error}; fetch the version again"
            ) from error
        if len(diff) != size:
            raise IntegrityError(f"delta block {index} holds {len(diff)} bytes, expected {size}")
        target = _u8(payload, block, block + size)
        np.bitwise_xor(target, np.frombuffer(diff, np.uint8), out=target)

    with ThreadPoolExecutor(THREADS, thread_name_prefix="delta") as pool:
        list(pool.map(xor_into, enumerate(spans)))


def _parse(delta: Buffer, expected_total: int) -> tuple[int, int, list[tuple[int, int]]]:
    """Block size, total size and each block's frame span in `delta`, checked against its length."""
    if len(delta) < _HEAD.size:
        raise IntegrityError(f"a delta of {len(delta)} bytes is shorter than its header; fetch it again")
    magic, block_bytes, total, blocks = _HEAD.unpack_from(delta)
    if magic != _MAGIC or block_bytes == 0 or blocks != -(-total // block_bytes):
        raise IntegrityError(f"not a {ENCODING} delta (bad header); fetch the version again")
    if total != expected_total:
        raise IntegrityError(f"the delta rebuilds {total} bytes but the base holds {expected_total}")
    lengths = struct.unpack_from(f"<{blocks}I", delta, _HEAD.size)
    spans, cursor = [], _HEAD.size + 4 * blocks
    for length in lengths:
        spans.append((cursor, cursor + length))
        cursor += length
    if cursor != len(delta):
        raise IntegrityError(f"the delta's frames span {cursor} bytes but it holds {len(delta)}; fetch it again")
    return block_bytes, total, spans


def _u8(buffer: Buffer, start: int, end: int) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8, count=end - start, offset=start)


# -- manifests ----------------------------------------------------------------------------------------------


def changed_share(base: Buffer, target: Buffer, every: int = SAMPLE_EVERY) -> float:
    """The share of bytes that differ, estimated on one 64 KiB window in `every` (a quick look before
    encoding: small windows spread over the payload, so a small payload is not compared whole)."""
    differ = seen = 0
    for start in range(0, len(target), SAMPLE_BYTES * every):
        end = min(start + SAMPLE_BYTES, len(target))
        differ += int(np.count_nonzero(_u8(base, start, end) != _u8(target, start, end)))
        seen += end - start
    return differ / seen if seen else 0.0


def against(base: Packed, target: Packed, max_changed: float = MAX_CHANGED) -> Packed | None:
    """`target` as a delta against `base` (manifest and delta data), or None when that would not pay.

    It pays when few bytes change (bf16 at a small learning rate); when many do (fp32, or a large learning
    rate) zstd is slow on the XOR and saves little, so the version goes as a keyframe (bench/sync.py).
    """
    try:
        check_same_layout(base.manifest, target.manifest)
    except InvalidRequest:
        return None
    if changed_share(base.payload, target.payload) > max_changed:
        return None
    delta = encode(base.payload, target.payload)
    digests = chunk_digests(delta, target.manifest.chunk_size)
    return Packed(describe(target.manifest, base.manifest, delta, digests), delta)


def describe(
    target: common_pb2.WeightManifest, base: common_pb2.WeightManifest, delta: Buffer, chunk_digests: list[str]
) -> common_pb2.WeightManifest:
    """`target`'s manifest (its digests stay those of the full version) marked as a delta against `base`."""
    check_same_layout(base, target)
    described = common_pb2.WeightManifest()
    described.CopyFrom(target)
    described.delta.CopyFrom(
        common_pb2.WeightDelta(
            base_version=base.version,
            base_sha256=base.sha256,
            encoding=ENCODING,
            encoded_bytes=len(delta),
            chunk_sha256=chunk_digests,
        )
    )
    return described


def full(manifest: common_pb2.WeightManifest) -> common_pb2.WeightManifest:
    """The manifest of the full version (no delta): what a reconstruction is served under."""
    plain = common_pb2.WeightManifest()
    plain.CopyFrom(manifest)
    plain.ClearField("delta")
    return plain


def transport(manifest: common_pb2.WeightManifest) -> common_pb2.WeightManifest:
    """A manifest of the encoded bytes themselves (one U8 tensor), to stream and verify them chunk by chunk."""
    delta, size = manifest.delta, manifest.delta.encoded_bytes
    if delta.encoding != ENCODING:
        raise InvalidRequest(f"delta encoding {delta.encoding!r} is unknown; this build reads {ENCODING!r}")
    return common_pb2.WeightManifest(
        run_id=manifest.run_id,
        version=manifest.version,
        tensors=[common_pb2.TensorSpec(name="delta", dtype="U8", shape=[size], offset=0, nbytes=size)],
        total_bytes=size,
        chunk_size=manifest.chunk_size,
        chunk_sha256=list(delta.chunk_sha256),
        sha256=payload_digest(list(delta.chunk_sha256)),
    )


def check_same_layout(base: common_pb2.WeightManifest, target: common_pb2.WeightManifest) -> None:
    """A delta only relates versions with the same tensors (names, dtypes, shapes) and chunking."""
    if base.total_bytes != target.total_bytes or base.chunk_size != target.chunk_size:
        raise InvalidRequest("base and target differ in size or chunking; publish the target as a keyframe")
    for a, b in zip(base.tensors, target.tensors, strict=False):
        if (a.name, a.dtype, list(a.shape)) != (b.name, b.dtype, list(b.shape)):
            raise InvalidRequest(f"tensor {b.name!r} differs from the base's {a.name!r}; publish a keyframe")
    if len(base.tensors) != len(target.tensors):
        raise InvalidRequest("base and target hold different tensors; publish the target as a keyframe")


def is_delta(manifest: common_pb2.WeightManifest) -> bool:
    return manifest.HasField("delta")
