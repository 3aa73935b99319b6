"""`cadence serve trainer` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pathlib import Path

from cadence.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """`cadence serve trainer`."""

    broker_addr: str = "127.0.0.1:50053"
    """Weight broker `host:port` (`CADENCE_BROKER_ADDR`)."""
    run_dir: Path = Path("runs")
    """Where metrics, checkpoints and reports go (`CADENCE_RUN_DIR`)."""
    config: Path | None = None
    """Run config YAML (`CADENCE_CONFIG`)."""
