"""The broker's weight store, without gRPC: visibility, conflicts, retention, reference counting, budget, watch,
and the directory store's crash safety and reload."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cadence.broker.directory_store import DirectoryStore
from cadence.broker.factory import open_store
from cadence.broker.store import MemoryStore, WeightStore
from cadence.errors import ConfigError, Conflict, InvalidRequest, NotReady, Overloaded, TooLarge, VersionNotFound
from cadence.weights import Packed, pack

torch.set_num_threads(1)


def packed(version: int, run_id: str = "run-a", numel: int = 3000, chunk_bytes: int = 4096) -> Packed:
    """A small state dict (fp32 + bf16) whose content depends on the version; several chunks."""
    gen = torch.Generator().manual_seed(version)
    state = {
        "w": torch.randn(numel, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
    }
    return pack(state, run_id=run_id, version=version, chunk_bytes=chunk_bytes)


def publish(store: WeightStore, item: Packed) -> int:
    assert store.check_publish(item.manifest) is None
    with store.reserve(item.manifest.total_bytes):
        return store.put(item.manifest, item.payload).version


@pytest.fixture(params=["memory", "dir"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., WeightStore]:
    def make(**kwargs: int) -> WeightStore:
        return MemoryStore(**kwargs) if request.param == "memory" else DirectoryStore(tmp_path / "store", **kwargs)

    return make


def test_put_then_read_back_exactly(make_store: Callable[..., WeightStore]) -> None:
    store = make_store()
    item = packed(1)
    assert store.latest("run-a") is None
    publish(store, item)
    info = store.latest("run-a")
    assert (info.version, info.total_bytes, info.sha256) == (1, len(item.payload), item.manifest.sha256)
    with store.open("run-a", 1) as reader:
        assert bytes(reader.payload[:]) == bytes(item.payload)
        assert reader.manifest == item.manifest
    assert store.stats().active_reads == 0


def test_older_or_equal_version_is_refused_unless_identical(make_store: Callable[..., WeightStore]) -> None:
    store = make_store()
    publish(store, packed(3))
    same = store.check_publish(packed(3).manifest)
    assert same is not None and same.version == 3  # idempotent re-publish
    with pytest.raises(Conflict, match="already published with another payload"):
        store.check_publish(packed(3, numel=10).manifest)
    with pytest.raises(Conflict, match="not newer than the latest, 3; publish a version greater than 3"):
        store.check_publish(packed(2).manifest)
    assert store.check_publish(packed(2, run_id="run-b").manifest) is None  # runs are independent


def test_retention_keeps_newest_and_names_what_is_available(make_store: Callable[..., WeightStore]) -> None:
    store = make_store(retain=2)
    for version in (1, 2, 3, 4):
        publish(store, packed(version))
    assert [info.version for info in store.versions("run-a")] == [3, 4]
    assert store.stats().stored_bytes == 2 * len(packed(1).payload)
    with pytest.raises(VersionNotFound, match=r"version 1 of run 'run-a' is not held.*available: \[3, 4\]"):
        store.open("run-a", 1)


def test_a_version_being_read_outlives_eviction(make_store: Callable[..., WeightStore]) -> None:
    store = make_store(retain=1)
    first = packed(1)
    publish(store, first)
    reader = store.open("run-a", 1)
    publish(store, packed(2))
    assert [info.version for info in store.versions()] == [2]
    with pytest.raises(VersionNotFound):
        store.open("run-a", 1)
    view = memoryview(reader.payload)  # as a fetch stream holds it
    assert bytes(view) == bytes(first.payload)  # still intact while held
    assert store.stats().stored_bytes == 2 * len(first.payload)
    reader.close()
    reader.close()  # idempotent
    assert bytes(view[:64]) == bytes(first.payload[:64])  # a view outliving the reader stays valid
    assert store.stats().stored_bytes == len(first.payload)
    assert store.stats().active_reads == 0


def test_byte_budget_bounds_memory(make_store: Callable[..., WeightStore]) -> None:
    size = len(packed(1).payload)
    store = make_store(retain=1, max_bytes=2 * size)
    publish(store, packed(1))
    with store.reserve(size), pytest.raises(Overloaded, match="would exceed max_bytes"), store.reserve(size):
        pass
    assert store.stats().staging_bytes == 0
    with pytest.raises(TooLarge, match="raise CADENCE_MAX_BYTES"):
        store.check_publish(packed(2, numel=3 * size).manifest)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "F8_E4M3", "unknown dtype 'F8_E4M3'"),
        ("nbytes", 5, "nbytes 5 does not match shape"),
    ],
)
def test_bad_manifest_is_refused(field: str, value: object, message: str) -> None:
    item = packed(1)
    setattr(item.manifest.tensors[0], field, value)
    with pytest.raises(InvalidRequest, match=message):
        MemoryStore().check_publish(item.manifest)


def test_run_id_must_be_safe_for_a_folder_name() -> None:
    with pytest.raises(InvalidRequest, match=r"run id '\.\./etc' is not valid"):
        MemoryStore().check_publish(packed(1, run_id="../etc").manifest)


def test_watch_gives_latest_first_then_each_new_version_in_order() -> None:
    store = MemoryStore(retain=5)
    publish(store, packed(1))
    publish(store, packed(2))
    seen: queue.Queue[int] = queue.Queue()
    stop = threading.Event()

    def watch() -> None:
        for info in store.watch("run-a", -1, stop.is_set, poll=0.05):
            seen.put(info.version)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert seen.get(timeout=5) == 2  # a late watcher gets the latest at once, not the history
    publish(store, packed(3))
    assert seen.get(timeout=5) == 3
    publish(store, packed(4))
    publish(store, packed(5))
    assert [seen.get(timeout=5), seen.get(timeout=5)] == [4, 5]
    assert store.stats().watchers == 1
    store.close()  # the server's drain ends every watch
    watcher.join(5)
    assert not watcher.is_alive() and store.stats().watchers == 0
    with pytest.raises(NotReady, match="shutting down"):
        next(store.watch("run-a", -1, stop.is_set))


def test_directory_store_reloads_and_drops_partial_or_corrupt_versions(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = DirectoryStore(root, retain=3)
    for version in (1, 2, 3):
        publish(store, packed(version))
    run_dir = root / "run-a"
    (run_dir / ".tmp-4-deadbeef").mkdir()  # a publish interrupted by a crash before its rename
    (run_dir / ".tmp-4-deadbeef" / "payload.bin").write_bytes(b"partial")
    with open(run_dir / "v000000000002" / "payload.bin", "r+b") as handle:
        handle.write(b"\xff\xff")  # bit rot
    reopened = DirectoryStore(root, retain=1)  # retention applies at load too
    assert [info.version for info in reopened.versions("run-a")] == [3]
    assert sorted(p.name for p in run_dir.iterdir()) == ["v000000000003"]
    with reopened.open("run-a", 3) as reader:
        assert bytes(reader.payload[:]) == bytes(packed(3).payload)
    with pytest.raises(Conflict):
        reopened.check_publish(packed(3, numel=10).manifest)


def test_empty_payload_round_trips_in_a_directory(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    item = pack({"empty": torch.empty(0, 4)}, run_id="run-a", version=0)
    publish(store, item)
    with DirectoryStore(tmp_path).open("run-a", 0) as reader:
        assert reader.payload == b"" and reader.manifest.tensors[0].shape == [0, 4]


def test_open_store_validates_its_spec(tmp_path: Path) -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    assert isinstance(open_store(str(tmp_path)), DirectoryStore)
    with pytest.raises(ConfigError, match="--store memory or --store DIR"):
        open_store("")
    with pytest.raises(ConfigError, match="retain must be at least 1"):
        open_store("memory", retain=0)
