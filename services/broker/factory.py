"""Opens the broker's weight store from its spec; the one place that knows every store class."""

from __future__ import annotations

from pathlib import Path

from cadence.broker.directory_store import DirectoryStore
from cadence.broker.store import MemoryStore, WeightStore
from cadence.errors import ConfigError


def open_store(spec: str, retain: int = 2, max_bytes: int = 16 << 30) -> WeightStore:
    """`memory` or a directory path (created if missing)."""
    if spec == "memory":
        return MemoryStore(retain, max_bytes)
    if not spec:
        raise ConfigError("the store is empty: pass --store memory or --store DIR (CADENCE_STORE)")
    return DirectoryStore(Path(spec), retain, max_bytes)
