"""`cadence serve broker` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pydantic import field_validator

from cadence.settings import ServiceSettings


class BrokerSettings(ServiceSettings):
    """`cadence serve broker`."""

    store: str = "memory"
    """`memory` or a directory (a PVC in Kubernetes) (`CADENCE_STORE`)."""
    retain: int = 2
    """Versions kept (`CADENCE_RETAIN`)."""
    max_bytes: int = 16 << 30
    """Most payload bytes held, publishes in flight included (`CADENCE_MAX_BYTES`); ≥ (retain + 1) × version size."""
    memory_bytes: int = 0
    """With `store: memory`, most payload bytes held in memory (`CADENCE_MEMORY_BYTES`); a version that would
    pass it lives in a file under `spill_dir`. 0: no ceiling (everything in memory, up to `max_bytes`)."""
    spill_dir: str = "/tmp/cadence-broker-spill"
    """Where versions past `memory_bytes` live (`CADENCE_SPILL_DIR`; a volume, emptied at start)."""

    @field_validator("max_bytes")
    @classmethod
    def _positive_max_bytes(cls, value: int) -> int:
        if value < 1:
            raise ValueError("CADENCE_MAX_BYTES must be positive: at least (retain + 1) × the size of one version")
        return value

    @field_validator("retain")
    @classmethod
    def _positive_retain(cls, value: int) -> int:
        if value < 1:
            raise ValueError("CADENCE_RETAIN must be at least 1 (the newest version is always kept)")
        return value
