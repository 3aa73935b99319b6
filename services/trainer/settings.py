"""`cadence serve trainer` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from cadence.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """`cadence serve trainer`."""

    broker_addr: str = "127.0.0.1:50053"
    """Weight broker `host:port` (`CADENCE_BROKER_ADDR`)."""
    keyframe_every: int = Field(10, ge=1)
    """Publish every n-th version in full, the others as deltas where they pay (`CADENCE_KEYFRAME_EVERY`)."""
    run_dir: Path = Path("runs")
    """Where metrics, checkpoints and reports go (`CADENCE_RUN_DIR`)."""
    config: Path | None = None
    """Run config YAML (`CADENCE_CONFIG`)."""
