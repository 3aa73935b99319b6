"""The broker's versioned weight store: payloads plus manifests, in memory or on a directory (a PVC).

A version becomes visible only once it is complete and verified (the caller assembles and checks the chunks,
`put` stores the result in one step). Per run it keeps the newest `retain` versions plus any older version a
fetch is still reading (reference counted), and never holds more than `max_bytes` of payload, publishes in
flight included. The directory backend is `cadence.broker.directory_store`.

A version may be stored as a delta against the one before it (`cadence.weights_delta`): its slot then holds
the delta, the run's newest version is kept rebuilt in full beside it (`cadence.broker.chain`), and retention
keeps every version back to the keyframe the retained deltas build on.

Pure logic: no gRPC. `cadence.broker.server` is the transport around it.
"""

from __future__ import annotations

import mmap
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cadence import weights_delta
from cadence.broker.chain import Head, advance, rebuild
from cadence.errors import (
    ConfigError,
    Conflict,
    IntegrityError,
    InvalidRequest,
    NotReady,
    Overloaded,
    TooLarge,
    VersionNotFound,
)
from cadence.logging import get_logger
from cadence.v1.common_pb2 import VersionInfo, WeightManifest
from cadence.weights import Buffer, allocate, validate_manifest, version_info

log = get_logger(__name__)

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
Payload = bytes | bytearray | mmap.mmap


@dataclass
class Slot:
    """One stored version; `evicted` slots stay only while `readers` > 0 and are invisible to new fetches."""

    info: VersionInfo
    manifest: WeightManifest
    payload: Payload
    path: Path | None = None
    readers: int = 0
    evicted: bool = False


@dataclass(frozen=True)
class StoreStats:
    """What `Status` and the metrics report."""

    versions: list[VersionInfo]
    stored_bytes: int
    staging_bytes: int
    max_bytes: int
    active_reads: int
    watchers: int
    retain: int


class Reader:
    """A held reference to one version; `close()` (or leaving the `with`) lets eviction reclaim it."""

    def __init__(self, store: WeightStore, slot: Slot) -> None:
        self._store, self._slot, self._closed = store, slot, False
        self.info: VersionInfo = slot.info
        self.manifest: WeightManifest = slot.manifest
        self.payload: Payload = slot.payload

    def close(self) -> None:
        """Release the reference (idempotent)."""
        self._store._release(self)  # atomic: a gRPC callback and the stream's own cleanup may race

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_run_id(run_id: str) -> str:
    """Run ids name folders on the volume, so they are restricted to a safe alphabet."""
    if not RUN_ID.match(run_id):
        raise InvalidRequest(
            f"run id {run_id!r} is not valid: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with . _ -)"
        )
    return run_id


class WeightStore(ABC):
    """Versions per run with retention, reference counting, a byte budget and change notification."""

    def __init__(self, retain: int = 2, max_bytes: int = 16 << 30) -> None:
        if retain < 1:
            raise ConfigError("retain must be at least 1 (the newest version is always kept)")
        if max_bytes < 1:
            raise ConfigError("max_bytes must be positive (CADENCE_MAX_BYTES)")
        self.retain = retain
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._publish_lock = threading.Lock()
        self._runs: dict[str, dict[int, Slot]] = {}
        self._heads: dict[str, Head] = {}  # each run's newest version in full
        self._staging = 0
        self._watchers = 0
        self._closed = False

    # -- publishing -------------------------------------------------------------------------------------

    def check_publish(self, manifest: WeightManifest) -> VersionInfo | None:
        """Validate a manifest before its data arrives.

        Returns the stored version's info for an idempotent re-publish (same version, same digest), None when
        the data should be sent; raises InvalidRequest or Conflict otherwise.
        """
        validate_manifest(manifest)
        if weights_delta.is_delta(manifest):
            validate_manifest(weights_delta.transport(manifest))
        check_run_id(manifest.run_id)
        if manifest.total_bytes > self.max_bytes:
            raise TooLarge(
                f"version {manifest.version} is {manifest.total_bytes} bytes but the broker holds at most "
                f"{self.max_bytes}; raise CADENCE_MAX_BYTES to at least (retain + 1) × the version size"
            )
        with self._cond:
            if self._closed:
                raise NotReady("the broker is shutting down; publish to its replacement")
            return self._admit(manifest)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Count a publish's bytes against `max_bytes` while its data is in flight."""
        with self._cond:
            held = self._stored_bytes()
            if held + self._staging + nbytes > self.max_bytes:
                raise Overloaded(
                    f"the broker holds {held} bytes and receives {self._staging} more; {nbytes} more would "
                    f"exceed max_bytes={self.max_bytes}: retry once fetches of evicted versions finish, or "
                    f"raise CADENCE_MAX_BYTES to at least (retain + 1) × the version size",
                    retry_after=2.0,
                )
            self._staging += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._staging -= nbytes

    def put(self, manifest: WeightManifest, payload: Payload) -> VersionInfo:
        """Store a complete, verified payload (or delta) and make it visible; evict beyond `retain`.

        A delta must build on the run's newest version and rebuild exactly the manifest's digests (else
        `Conflict` or `IntegrityError`, and nothing changes).
        """
        expected = stored_size(manifest)
        if len(payload) != expected:
            raise InvalidRequest(f"payload is {len(payload)} bytes, the manifest says {expected}")
        with self._publish_lock:
            with self._cond:
                existing = self._admit(manifest)
            if existing is not None:
                return existing
            info = version_info(manifest, published_unix=time.time())
            head = self._next_head(manifest, payload)
            stored, path = self._persist(manifest, payload, info)
            with self._cond:
                self._runs.setdefault(info.run_id, {})[info.version] = Slot(info, manifest, stored, path)
                self._heads[info.run_id] = head or Head(info.version, manifest, stored)
                self._evict(info.run_id)
                self._cond.notify_all()
        log.info("published", extra={"run_id": info.run_id, "version": info.version, "bytes": info.total_bytes})
        return info

    # -- reading ----------------------------------------------------------------------------------------

    def latest(self, run_id: str) -> VersionInfo | None:
        with self._cond:
            held = self._held(run_id)
        return held[-1] if held else None

    def versions(self, run_id: str | None = None) -> list[VersionInfo]:
        """Visible versions, oldest first (all runs when `run_id` is None)."""
        with self._cond:
            runs = [run_id] if run_id is not None else sorted(self._runs)
            return [info for run in runs for info in self._held(run)]

    def open(self, run_id: str, version: int) -> Reader:
        """Hold a version for reading; raises VersionNotFound naming the versions available."""
        with self._cond:
            slot = self._runs.get(run_id, {}).get(version)
            if slot is None or slot.evicted:
                held = [info.version for info in self._held(run_id)]
                raise VersionNotFound(
                    f"version {version} of run {run_id!r} is not held (evicted or never published); "
                    f"available: {held or 'none yet'}; fetch the latest instead"
                )
            slot.readers += 1
            return Reader(self, slot)

    def full(self, reader: Reader) -> Head:
        """The full version a reader holds: its payload, the run's rebuilt head, or a rebuild on demand."""
        if not weights_delta.is_delta(reader.manifest):
            return Head(reader.info.version, reader.manifest, reader.payload)
        with self._cond:
            head = self._heads.get(reader.info.run_id)
            if head is not None and head.version == reader.info.version:
                return head
            held = {v: (slot.manifest, slot.payload) for v, slot in self._runs[reader.info.run_id].items()}
        return rebuild(reader.info.version, held)

    def watch(
        self, run_id: str, after: int, should_stop: Callable[[], bool], poll: float = 0.5
    ) -> Iterator[VersionInfo]:
        """The latest version first if newer than `after`, then every newer version in order.

        Ends when the store closes or `should_stop()` turns true (checked every `poll` seconds). A watcher
        that falls so far behind that a version was evicted simply skips it.
        """
        with self._cond:
            if self._closed:
                raise NotReady("the broker is shutting down; watch its replacement")
            self._watchers += 1
        try:
            last, first = after, True
            while True:
                with self._cond:
                    while not (self._closed or should_stop() or self._newer(run_id, last)):
                        self._cond.wait(poll)
                    if self._closed or should_stop():
                        return
                    newer = self._newer(run_id, last)
                for info in newer[-1:] if first else newer:
                    yield info
                    last = info.version
                first = False
        finally:
            with self._cond:
                self._watchers -= 1

    def stats(self) -> StoreStats:
        with self._cond:
            return StoreStats(
                versions=[info for run in sorted(self._runs) for info in self._held(run)],
                stored_bytes=self._stored_bytes(),
                staging_bytes=self._staging,
                max_bytes=self.max_bytes,
                active_reads=sum(slot.readers for slots in self._runs.values() for slot in slots.values()),
                watchers=self._watchers,
                retain=self.retain,
            )

    def close(self) -> None:
        """Refuse new publishes and end every watch (the server's drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- internals (call with self._cond held) ------------------------------------------------------------

    def _admit(self, manifest: WeightManifest) -> VersionInfo | None:
        run_id, version = manifest.run_id, manifest.version
        slot = self._runs.get(run_id, {}).get(version)
        if slot is not None and not slot.evicted:
            if slot.info.sha256 == manifest.sha256:
                return slot.info
            raise Conflict(
                f"version {version} of run {run_id!r} is already published with another payload "
                f"(sha256 {slot.info.sha256[:12]}…, this one {manifest.sha256[:12]}…); publish it as a new version"
            )
        held = self._held(run_id)
        if held and version <= held[-1].version:
            raise Conflict(
                f"version {version} of run {run_id!r} is not newer than the latest, {held[-1].version}; "
                f"publish a version greater than {held[-1].version}"
            )
        return None

    def _held(self, run_id: str) -> list[VersionInfo]:
        slots = self._runs.get(run_id, {})
        return [slots[v].info for v in sorted(slots) if not slots[v].evicted]

    def _newer(self, run_id: str, after: int) -> list[VersionInfo]:
        return [info for info in self._held(run_id) if info.version > after]

    def _stored_bytes(self) -> int:
        stored = sum(stored_size(slot.manifest) for slots in self._runs.values() for slot in slots.values())
        heads = [(run, head) for run, head in self._heads.items() if head.version in self._runs.get(run, {})]
        rebuilt = [head for run, head in heads if weights_delta.is_delta(self._runs[run][head.version].manifest)]
        return stored + sum(head.manifest.total_bytes for head in rebuilt)

    def _next_head(self, manifest: WeightManifest, payload: Payload) -> Head | None:
        """For a delta, the run's newest version with it applied (verified); None for a keyframe."""
        if not weights_delta.is_delta(manifest):
            return None
        with self._cond:
            head = self._heads.get(manifest.run_id)
        base = manifest.delta.base_version
        if head is None or (head.version, head.manifest.sha256) != (base, manifest.delta.base_sha256):
            newest = "none" if head is None else f"version {head.version}"
            raise Conflict(
                f"version {manifest.version} is a delta against version {base} but the newest version the "
                f"broker holds of run {manifest.run_id!r} is {newest}; publish version {manifest.version} as a keyframe"
            )
        return advance(head, manifest, payload)

    def _restore_head(self, run_id: str) -> None:
        """Rebuild a reloaded run's newest version; versions whose chain is broken are dropped."""
        slots = self._runs[run_id]
        held = {v: (slot.manifest, slot.payload) for v, slot in slots.items()}
        for version in sorted(slots, reverse=True):
            try:
                self._heads[run_id] = rebuild(version, held)
                return
            except (IntegrityError, VersionNotFound) as error:
                log.warning(
                    "dropping a version that cannot be rebuilt", extra={"version": version, "error": str(error)}
                )
                self._drop(run_id, version)

    def _evict(self, run_id: str) -> None:
        slots = self._runs[run_id]
        visible = [v for v in sorted(slots) if not slots[v].evicted]
        cut = max(0, len(visible) - self.retain)
        while cut > 0 and weights_delta.is_delta(slots[visible[cut]].manifest):
            cut -= 1  # a retained delta needs every version back to its keyframe
        for version in visible[:cut]:
            slots[version].evicted = True
            if slots[version].readers == 0:
                self._drop(run_id, version)

    def _drop(self, run_id: str, version: int) -> None:
        slot = self._runs[run_id].pop(version)
        self._discard(slot)
        log.info("evicted", extra={"run_id": run_id, "version": version})

    def _release(self, reader: Reader) -> None:
        with self._cond:
            if reader._closed:
                return
            reader._closed = True
            slot = reader._slot
            slot.readers -= 1
            if slot.evicted and slot.readers == 0:
                self._drop(slot.info.run_id, slot.info.version)

    # -- backend ------------------------------------------------------------------------------------------

    @abstractmethod
    def _persist(self, manifest: WeightManifest, payload: Payload, info: VersionInfo) -> tuple[Payload, Path | None]:
        """Make the payload durable in this backend; return what readers read and where it lives."""

    @abstractmethod
    def _discard(self, slot: Slot) -> None:
        """Free an evicted version nobody reads any more."""

    def receive_buffer(self, nbytes: int) -> Buffer:
        """Where a publish of `nbytes` is assembled (then handed to `put`): memory, unless a store says else."""
        return allocate(nbytes)


class MemoryStore(WeightStore):
    """Payloads held in process memory; gone when the broker restarts (trainers re-publish)."""

    def _persist(self, manifest: WeightManifest, payload: Payload, info: VersionInfo) -> tuple[Payload, Path | None]:
        return payload, None  # the caller hands over its buffer: no copy

    def _discard(self, slot: Slot) -> None:
        slot.payload = b""


def stored_size(manifest: WeightManifest) -> int:
    """Bytes a version takes in the store: its delta's, or its payload's for a keyframe."""
    return manifest.delta.encoded_bytes if weights_delta.is_delta(manifest) else manifest.total_bytes
