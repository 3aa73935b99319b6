"""`cadence serve inference` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pydantic import Field

from cadence.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """`cadence serve inference`."""

    engine: str = "auto"
    """`vllm`, `hf`, or `auto` (vllm when importable) (`CADENCE_ENGINE`)."""
    model: str = "tiny"
    """Model directory, hub id, or a seed-model name (`CADENCE_MODEL`)."""
    broker_addr: str = "127.0.0.1:50053"
    """Weight broker `host:port` (`CADENCE_BROKER_ADDR`)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one vLLM engine shards the model over (`CADENCE_TENSOR_PARALLEL_SIZE`); the hf engine ignores it."""
    worker: bool = True
    """Consume the run's prompt stream (`CADENCE_WORKER`); off serves only `Generate`."""
    worker_id: str = ""
    """Consumer name in the `inference` group (`CADENCE_WORKER_ID`); empty: `<hostname>-<pid>`."""
    batch_prompts: int = Field(32, ge=1, le=1024)
    """Prompts taken off the stream per engine batch (`CADENCE_BATCH_PROMPTS`)."""
    reclaim_idle_ms: int = Field(30_000, ge=100)
    """A prompt left unacknowledged this long by a dead worker is taken over (`CADENCE_RECLAIM_IDLE_MS`)."""
