"""The broker's directory backend: versions on a directory (a PVC), read through mmap, surviving restarts.

Each version is written into a temporary folder, fsynced, and renamed into place (`<root>/<run_id>/v<version>/`),
so a crash never leaves half a version visible; at start the store reloads and re-verifies what is on disk and
deletes the leftovers of interrupted writes.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import uuid
import weakref
from pathlib import Path

from cadence import weights_delta
from cadence.broker.store import RUN_ID, MemoryStore, Payload, Slot, WeightStore, stored_size
from cadence.errors import ConfigError, InvalidRequest, Overloaded
from cadence.logging import get_logger
from cadence.v1.common_pb2 import VersionInfo, WeightManifest
from cadence.weights import Buffer, validate_manifest, verify_payload, version_info

log = get_logger(__name__)

_VERSION_DIR = re.compile(r"^v(\d{12})$")


class DirectoryStore(WeightStore):
    """Payloads on a directory (`<root>/<run_id>/v<version>/`), read through mmap; survives restarts."""

    def __init__(self, root: Path, retain: int = 2, max_bytes: int = 16 << 30) -> None:
        super().__init__(retain, max_bytes)
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"cannot create the store directory {self.root}: {error}; pass a writable --store"
            ) from error
        self._load()

    def _persist(self, manifest: WeightManifest, payload: Payload, info: VersionInfo) -> tuple[Payload, Path | None]:
        run_dir = self.root / info.run_id
        run_dir.mkdir(exist_ok=True)
        tmp = run_dir / f".tmp-{info.version}-{uuid.uuid4().hex}"
        final = run_dir / f"v{info.version:012d}"
        tmp.mkdir()
        try:
            _write_synced(tmp / "payload.bin", payload)
            _write_synced(tmp / "manifest.pb", manifest.SerializeToString())
            _write_synced(tmp / "info.json", json.dumps({"published_unix": info.published_unix}).encode())
            os.rename(tmp, final)
            _fsync_dir(run_dir)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Overloaded(
                f"cannot write version {info.version} under {run_dir}: {error}; free space on the volume or "
                f"lower --retain",
                retry_after=5.0,
            ) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _map(final / "payload.bin", len(payload)), final

    def _discard(self, slot: Slot) -> None:
        # Dropping the map (not closing it) lets views a finishing stream still holds stay valid; it is
        # unmapped when the last one goes, and POSIX keeps the deleted file's pages until then.
        slot.payload = b""
        if slot.path is not None:
            shutil.rmtree(slot.path, ignore_errors=True)

    def _load(self) -> None:
        """Reload verified versions, delete leftovers of interrupted writes, then apply retention."""
        for run_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and RUN_ID.match(p.name)):
            for entry in sorted(run_dir.iterdir()):
                if entry.name.startswith(".tmp-"):
                    log.warning("removing an interrupted publish", extra={"path": str(entry)})
                    shutil.rmtree(entry, ignore_errors=True)
                elif _VERSION_DIR.match(entry.name):
                    slot = self._load_version(run_dir.name, entry)
                    if slot is not None:
                        self._runs.setdefault(slot.info.run_id, {})[slot.info.version] = slot
            if run_dir.name in self._runs:
                self._restore_head(run_dir.name)
                self._evict(run_dir.name)
        log.info("store loaded", extra={"root": str(self.root), "versions": len(self.versions())})

    def _load_version(self, run_id: str, path: Path) -> Slot | None:
        try:
            manifest = WeightManifest.FromString((path / "manifest.pb").read_bytes())
            published = json.loads((path / "info.json").read_text())["published_unix"]
            validate_manifest(manifest)
            payload = _map(path / "payload.bin", stored_size(manifest))
            if (manifest.run_id, f"v{manifest.version:012d}") != (run_id, path.name):
                raise InvalidRequest(f"manifest names run {manifest.run_id!r} version {manifest.version}")
            delta = weights_delta.is_delta(manifest)
            verify_payload(weights_delta.transport(manifest) if delta else manifest, payload)  # a delta: when rebuilt
        except Exception as error:
            log.warning("discarding an unreadable stored version", extra={"path": str(path), "error": str(error)})
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Slot(version_info(manifest, published), manifest, payload, path)


class SpillingStore(MemoryStore):
    """The memory store with a ceiling on the memory it holds (`memory_bytes`): a version that would pass it
    is assembled in, and served from, a file under `spill_dir` (a volume; read through mmap, deleted when
    evicted), so a version larger than the pod's memory is kept rather than refused or OOM-killed. Like the
    memory store, nothing survives a restart (the trainer re-publishes); `max_bytes` still bounds the total."""

    def __init__(self, spill_dir: Path, retain: int = 2, max_bytes: int = 16 << 30, memory_bytes: int = 4 << 30):
        super().__init__(retain, max_bytes)
        self.spill_dir, self.memory_bytes = Path(spill_dir), memory_bytes
        shutil.rmtree(self.spill_dir, ignore_errors=True)  # a previous process's versions are gone with it
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._files: weakref.WeakKeyDictionary[mmap.mmap, Path] = weakref.WeakKeyDictionary()
        """File-backed receive buffers (a failed publish's goes with its buffer) → their (unlinked) file."""

    def in_memory(self) -> int:
        """Payload bytes held in process memory (stored versions not in a file)."""
        with self._cond:
            return sum(len(s.payload) for run in self._runs.values() for s in run.values() if s.path is None)

    def receive_buffer(self, nbytes: int) -> Buffer:
        if nbytes == 0 or self.in_memory() + nbytes <= self.memory_bytes:
            return super().receive_buffer(nbytes)
        buffer, path = self._spill_file(nbytes)
        self._files[buffer] = path
        log.info("assembling a publish on the volume", extra={"bytes": nbytes, "dir": str(self.spill_dir)})
        return buffer

    def _persist(self, manifest: WeightManifest, payload: Payload, info: VersionInfo) -> tuple[Payload, Path | None]:
        path = self._files.pop(payload, None) if isinstance(payload, mmap.mmap) else None
        if path is None and len(payload) and self.in_memory() + len(payload) > self.memory_bytes:
            spilled, path = self._spill_file(len(payload))
            spilled[:] = payload
            payload = spilled
        return payload, path

    def _spill_file(self, nbytes: int) -> tuple[mmap.mmap, Path]:
        """A shared map of a new file of `nbytes` under `spill_dir`, unlinked at once: its blocks stay on the
        volume while the map lives and are freed with it (a crashed broker leaves nothing behind)."""
        path = self.spill_dir / f"{uuid.uuid4().hex}.bin"
        with open(path, "w+b") as handle:
            handle.truncate(nbytes)
            buffer = mmap.mmap(handle.fileno(), nbytes)
        path.unlink()
        return buffer, path

    def _discard(self, slot: Slot) -> None:
        slot.payload = b""  # the map goes with the last view a finishing stream holds, and the file's blocks with it


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _map(path: Path, size: int) -> Payload:
    """A read-only map of a payload file (mmap cannot map an empty file, so that one is just b"")."""
    if size == 0:
        return b""
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
