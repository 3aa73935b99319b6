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
    relay_port: int = Field(0, ge=0, le=65535)
    """Relay fan-out (`CADENCE_RELAY_PORT`): serve the weight chunks this replica has verified to other replicas on
    this port and fetch from them as the broker routes it, so the broker sends about one copy per version
    whatever the replica count. 0: off (one replica gains nothing); the chart turns it on for several replicas."""
    relay_addr: str = ""
    """`host:port` other replicas reach this one's relay at (`CADENCE_RELAY_ADDR`); empty: this host's IP and
    `relay_port` (a pod's IP in Kubernetes)."""
    broadcast: bool = False
    """Collective path (`CADENCE_BROADCAST`, vllm engine): join the broker's broadcast group and take each version
    by the trainer's broadcast (checked against the broker's manifest), fetching it only when that fails or this
    replica is not in the group carrying it. Off: fetch every version. The trainer's CADENCE_BROADCAST too."""
    broadcast_timeout_s: float = Field(30.0, gt=0)
    """How long joining a group or receiving a broadcast may wait (`CADENCE_BROADCAST_TIMEOUT_S`)."""
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
