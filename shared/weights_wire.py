"""Weight chunks on gRPC streams with one copy instead of three: the broker's (de)serializers.

A data chunk is framed by hand in exactly the bytes protobuf writes for `WeightChunk{data, offset}` (field 2,
length-delimited, then field 3, varint), so generated stubs on the other side interoperate unchanged. What
this saves: building a message and serializing it (two copies of every payload byte) on the sending side,
and parsing it (one more) on the receiving side, where the data stays a zero-copy view of the received
bytes. Manifests and anything unusual go through protobuf as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from cadence import weights_delta
from cadence.v1 import common_pb2
from cadence.weights import iter_chunks

_DATA_TAG = 0x12  # field 2, length-delimited
_OFFSET_TAG = 0x18  # field 3, varint


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A received data chunk: `data` is a view into the received message."""

    offset: int
    data: memoryview


def encode(message: common_pb2.WeightChunk | bytes) -> bytes:
    """Serializer: pre-framed bytes pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def frame(data: memoryview | bytes, offset: int) -> bytes:
    """The protobuf encoding of `WeightChunk(data=data, offset=offset)`, built with a single copy of `data`."""
    parts = [bytes([_DATA_TAG]), _varint(len(data)), data]
    if offset:
        parts += [bytes([_OFFSET_TAG]), _varint(offset)]
    return b"".join(parts)


def decode(raw: bytes) -> common_pb2.WeightManifest | DataChunk | None:
    """Deserializer: a manifest, a data chunk (zero-copy), or None for a message that is neither."""
    fast = _decode_data(raw)
    if fast is not None:
        return fast
    try:
        message = common_pb2.WeightChunk.FromString(raw)
    except DecodeError:
        return None
    body = message.WhichOneof("body")
    if body == "manifest":
        return message.manifest
    return DataChunk(message.offset, memoryview(message.data)) if body == "data" else None


def iter_frames(
    manifest: common_pb2.WeightManifest, payload: bytes | bytearray | memoryview, offset: int = 0
) -> Iterator[common_pb2.WeightChunk | bytes]:
    """Like `cadence.weights.iter_chunks`: the manifest, then framed data chunks from `offset` on.

    For a delta manifest (`cadence.weights_delta`) `payload` is the delta data, and offsets count in it.
    """
    carrier = weights_delta.transport(manifest) if weights_delta.is_delta(manifest) else manifest
    # iter_chunks checks the offset before its first item, the manifest; its copying chunks are never drawn.
    next(iter_chunks(carrier, payload, offset))
    yield common_pb2.WeightChunk(manifest=manifest)
    view = memoryview(payload)
    for start in range(offset, carrier.total_bytes, carrier.chunk_size):
        yield frame(view[start : start + carrier.chunk_size], start)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _decode_data(raw: bytes) -> DataChunk | None:
    """The fast path for exactly `data` then an optional `offset`; None sends it to protobuf."""
    if not raw or raw[0] != _DATA_TAG:
        return None
    length, pos = _read_varint(raw, 1)
    end = pos + length
    if length < 0 or end > len(raw):
        return None
    offset = 0
    if end < len(raw):
        if raw[end] != _OFFSET_TAG:
            return None
        offset, tail = _read_varint(raw, end + 1)
        if offset < 0 or tail != len(raw):
            return None
    return DataChunk(offset, memoryview(raw)[pos:end])
