"""The one-copy chunk framing writes exactly protobuf's bytes and reads anything protobuf writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cadence import weights_wire
from cadence.errors import InvalidRequest
from cadence.v1 import common_pb2


@pytest.mark.parametrize(("size", "offset"), [(0, 0), (3, 0), (300, 4 << 20), (70_000, 1 << 40)])
def test_frames_are_protobuf_bytes_and_decode_zero_copy(size: int, offset: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = weights_wire.frame(memoryview(data), offset)
    assert framed == common_pb2.WeightChunk(data=data, offset=offset).SerializeToString()
    chunk = weights_wire.decode(framed)
    assert isinstance(chunk, weights_wire.DataChunk)
    assert (bytes(chunk.data), chunk.offset) == (data, offset)
    assert chunk.data.obj is framed  # a view, not a copy


def test_decode_falls_back_to_protobuf_for_manifests_other_orders_and_garbage() -> None:
    manifest = common_pb2.WeightManifest(run_id="r", version=3, total_bytes=0, chunk_size=8)
    assert weights_wire.decode(common_pb2.WeightChunk(manifest=manifest).SerializeToString()) == manifest
    offset_first = bytes([0x18, 5, 0x12, 2]) + b"hi"
    chunk = weights_wire.decode(offset_first)
    assert isinstance(chunk, weights_wire.DataChunk) and (bytes(chunk.data), chunk.offset) == (b"hi", 5)
    assert weights_wire.decode(b"") is None
    assert weights_wire.decode(b"\xff\xff\xff") is None


def test_iter_frames_checks_the_resume_offset() -> None:
    manifest = common_pb2.WeightManifest(total_bytes=10, chunk_size=4)
    frames = list(weights_wire.iter_frames(manifest, bytes(range(10)), offset=4))
    assert frames[0].manifest == manifest
    assert [weights_wire.decode(f).offset for f in frames[1:]] == [4, 8]
    with pytest.raises(InvalidRequest, match="not a chunk boundary"):
        next(weights_wire.iter_frames(manifest, bytes(10), offset=3))


def test_the_broker_and_its_client_never_import_torch() -> None:
    code = "import sys, cadence.broker.main, cadence.broker.server, cadence.clients; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
