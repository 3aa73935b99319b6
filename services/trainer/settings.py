"""`cadence serve trainer` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cadence.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """`cadence serve trainer`."""

    broker_addr: str = "127.0.0.1:50053"
    """Weight broker `host:port` (`CADENCE_BROKER_ADDR`)."""
    keyframe_every: int = Field(10, ge=1)
    """Publish every n-th version in full, the others as deltas where they pay (`CADENCE_KEYFRAME_EVERY`)."""
    broadcast: bool = False
    """Collective path (`CADENCE_BROADCAST`): besides publishing, broadcast each version to the replicas in the
    broker's broadcast group, which then need not fetch it (`cadence.trainer.broadcasting`). Off: replicas fetch."""
    broadcast_addr: str = ""
    """Host replicas reach the trainer at for the broadcast rendezvous (`CADENCE_BROADCAST_ADDR`); empty: this
    host's IP (a pod's IP in Kubernetes). Each epoch opens on a free port there."""
    broadcast_backend: Literal["gloo", "nccl"] = "gloo"
    """The collective (`CADENCE_BROADCAST_BACKEND`): gloo (CPU, torch only) or nccl (GPU; needs vLLM here too)."""
    broadcast_timeout_s: float = Field(30.0, gt=0)
    """How long a rendezvous or broadcast may wait for the members (`CADENCE_BROADCAST_TIMEOUT_S`)."""
    run_dir: Path = Path("runs")
    """Where metrics, checkpoints and reports go (`CADENCE_RUN_DIR`)."""
    config: Path | None = None
    """Run config YAML (`CADENCE_CONFIG`)."""
