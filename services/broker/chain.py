"""Delta chains in the broker: rebuild full versions from a keyframe and the deltas after it, verified.

A version is stored as a keyframe (its payload) or as a delta against the version before it
(`cadence.weights_delta`). The broker keeps the newest version of each run rebuilt in full (the *head*), so
a late joiner or a restarted replica is served it at once, and rebuilds an older held version on demand. Every
rebuild is checked against the full version's chunk digests, so a delta that does not reproduce what the
trainer packed is refused at publish and can never be served.

Pure byte logic: no gRPC, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cadence import weights_delta
from cadence.errors import IntegrityError, VersionNotFound
from cadence.v1.common_pb2 import WeightManifest
from cadence.weights import Buffer, allocate, verify_payload

Stored = bytes | bytearray | memoryview | Buffer


@dataclass(frozen=True)
class Head:
    """A run's newest version in full: its manifest (no delta field) and payload, never written to."""

    version: int
    manifest: WeightManifest
    payload: Stored


def advance(head: Head, manifest: WeightManifest, delta: Stored) -> Head:
    """The version `delta` (described by `manifest`) encodes against `head`, in a new verified buffer.

    The head itself is left as it is: fetches in flight may still be streaming it.
    """
    payload = allocate(head.manifest.total_bytes)
    payload[:] = head.payload
    return _applied(Head(head.version, head.manifest, payload), manifest, delta)


def rebuild(version: int, held: Mapping[int, tuple[WeightManifest, Stored]]) -> Head:
    """Version `version` in full from the newest keyframe at or below it and the deltas after that.

    `held` maps versions to (manifest, stored payload); raises VersionNotFound when the chain is broken.
    """
    keyframe = version
    while keyframe in held and weights_delta.is_delta(held[keyframe][0]):
        keyframe = held[keyframe][0].delta.base_version
    if keyframe not in held:
        raise VersionNotFound(
            f"version {version} is held as a delta but the keyframe it builds on is gone; fetch the latest"
        )
    manifest, stored = held[keyframe]
    head = Head(keyframe, manifest, stored)
    for step in sorted(v for v in held if keyframe < v <= version):  # versions go up by s, each names its base
        head = advance(head, *held[step])
    return head


def _applied(base: Head, manifest: WeightManifest, delta: Stored) -> Head:
    """Apply `delta` onto `base.payload` (writable, owned by the caller) and verify the result."""
    if manifest.delta.base_version != base.version or manifest.delta.base_sha256 != base.manifest.sha256:
        raise IntegrityError(
            f"version {manifest.version} is a delta against version {manifest.delta.base_version} "
            f"({manifest.delta.base_sha256[:12]}…), not against {base.version} ({base.manifest.sha256[:12]}…)"
        )
    weights_delta.apply(base.payload, delta)
    target = weights_delta.full(manifest)
    verify_payload(target, base.payload)
    return Head(manifest.version, target, base.payload)
