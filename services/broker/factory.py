"""Opens the broker's weight store from its spec; the one place that knows every store class."""

from __future__ import annotations

from pathlib import Path

from cadence.broker.directory_store import DirectoryStore, SpillingStore
from cadence.broker.store import MemoryStore, WeightStore
from cadence.errors import ConfigError


def open_store(
    spec: str, retain: int = 2, max_bytes: int = 16 << 30, memory_bytes: int = 0, spill_dir: str = ""
) -> WeightStore:
    """`memory` (with `memory_bytes` > 0: spilling past it into `spill_dir`) or a directory path (created if
    missing)."""
    if spec == "memory" and memory_bytes > 0:
        return SpillingStore(Path(spill_dir), retain, max_bytes, memory_bytes)
    if spec == "memory":
        return MemoryStore(retain, max_bytes)
    if not spec:
        raise ConfigError("the store is empty: pass --store memory or --store DIR (CADENCE_STORE)")
    return DirectoryStore(Path(spec), retain, max_bytes)
