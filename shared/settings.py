"""Service settings from `CADENCE_*` environment variables: the one place that reads the environment.

Each service has one class; command-line flags override what the environment says. A required setting
that is missing fails at start-up with the variable's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS = {"inference": 50051, "reward": 50052, "broker": 50053, "trainer": 50054}
Settings = TypeVar("Settings", bound="CommonSettings")


class CommonSettings(BaseSettings):
    """Settings every process shares."""

    model_config = SettingsConfigDict(env_prefix="CADENCE_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cadence")
    """Cache root for seed models, compiled extensions and vLLM's cache (`CADENCE_HOME`)."""
    data_dir: Path | None = None
    """Where MATH-500, AMC23 and other dataset files live (`CADENCE_DATA_DIR`); unset: `../shared/data`
    beside the checkout."""
    log_level: str = "INFO"
    """Python logging level name (`CADENCE_LOG_LEVEL`)."""
    log_format: str = "text"
    """`text` for people, `json` for log collectors (`CADENCE_LOG_FORMAT`)."""

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("CADENCE_LOG_FORMAT must be 'text' or 'json'")
        return value


class ServiceSettings(CommonSettings):
    """What a networked service needs: where to listen and where Redis is."""

    host: str = "0.0.0.0"
    """Interface to bind (`CADENCE_HOST`)."""
    grpc_port: int = 0
    """gRPC port (`CADENCE_GRPC_PORT`); 0 means the service's default."""
    metrics_port: int = 0
    """Prometheus port (`CADENCE_METRICS_PORT`); 0 serves metrics only where a service has HTTP."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the data-plane streams (`CADENCE_REDIS_URL`)."""
    run_id: str = ""
    """The run whose streams to serve (`CADENCE_RUN_ID`); empty: take it from the run metadata."""
    grace_seconds: float = 10.0
    """How long SIGTERM waits for in-flight work before exiting (`CADENCE_GRACE_SECONDS`)."""


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


class RewardSettings(ServiceSettings):
    """`cadence serve reward`."""

    http_port: int = 8000
    """HTTP API port (`CADENCE_HTTP_PORT`)."""
    worker: bool = True
    """Consume the run's rollout stream (`CADENCE_WORKER`)."""
    reward_model: str = ""
    """Reward model directory or hub id for `chat` items (`CADENCE_REWARD_MODEL`); empty: math only."""
    pool_processes: int = 2
    """math-verify worker processes (`CADENCE_POOL_PROCESSES`)."""
    item_timeout_seconds: float = 5.0
    """Hard deadline per math item (`CADENCE_ITEM_TIMEOUT_SECONDS`)."""
    api_keys_file: Path | None = None
    """File with one API key per line (`CADENCE_API_KEYS_FILE`); none and no `api_keys`: auth off."""
    api_keys: str = ""
    """Comma-separated API keys (`CADENCE_API_KEYS`)."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest HTTP request body accepted; larger gets 413 (`CADENCE_MAX_BODY_BYTES`)."""
    max_items: int = 1024
    """Items per scoring request (`CADENCE_MAX_ITEMS`)."""
    max_response_chars: int = 65536
    """Characters per response, and per prompt (`CADENCE_MAX_RESPONSE_CHARS`)."""
    max_reference_chars: int = 8192
    """Characters per reference answer (`CADENCE_MAX_REFERENCE_CHARS`)."""
    max_inflight_items: int = 4096
    """Items being scored at once across all callers; beyond it HTTP answers 429 (`CADENCE_MAX_INFLIGHT_ITEMS`)."""
    max_inflight_requests: int = 64
    """HTTP scoring requests inside the service at once, queued ones included; beyond it 429
    (`CADENCE_MAX_INFLIGHT_REQUESTS`)."""
    rm_device: str = "auto"
    """Device for the reward model: `auto`, `cpu`, `cuda`, `cuda:1` (`CADENCE_RM_DEVICE`)."""
    rm_max_batch_tokens: int = 16384
    """Padded tokens per reward-model forward pass (`CADENCE_RM_MAX_BATCH_TOKENS`)."""
    rm_kind: str = "auto"
    """Reward-model layout: `auto` (from the checkpoint's architectures and weight names),
    `sequence-classification`, or `athene` (`CADENCE_RM_KIND`)."""
    worker_batch: int = 16
    """Rollouts the queue worker reads and scores at once (`CADENCE_WORKER_BATCH`)."""
    reclaim_idle_ms: int = Field(30_000, ge=100)
    """A rollout left unacknowledged this long by a dead worker is taken over (`CADENCE_RECLAIM_IDLE_MS`)."""

    @field_validator(
        "pool_processes", "max_items", "max_inflight_items", "max_inflight_requests", "worker_batch", "max_body_bytes"
    )
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class BrokerSettings(ServiceSettings):
    """`cadence serve broker`."""

    store: str = "memory"
    """`memory` or a directory (a PVC in Kubernetes) (`CADENCE_STORE`)."""
    retain: int = 2
    """Versions kept (`CADENCE_RETAIN`)."""
    max_bytes: int = 16 << 30
    """Most payload bytes held, publishes in flight included (`CADENCE_MAX_BYTES`); ≥ (retain + 1) × version size."""

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


class TrainerSettings(ServiceSettings):
    """`cadence serve trainer`."""

    broker_addr: str = "127.0.0.1:50053"
    """Weight broker `host:port` (`CADENCE_BROKER_ADDR`)."""
    run_dir: Path = Path("runs")
    """Where metrics, checkpoints and reports go (`CADENCE_RUN_DIR`)."""
    config: Path | None = None
    """Run config YAML (`CADENCE_CONFIG`)."""


def default_port(service: str) -> int:
    """The default gRPC port of a service (DESIGN.md §4)."""
    return DEFAULT_PORTS[service]


def with_flags(cls: type[Settings], flags: Mapping[str, Any]) -> Settings:
    """Settings from the environment, overridden by the flags that were given (`None`: not given)."""
    return cls(**{key: value for key, value in flags.items() if value is not None})


def from_argv(cls: type[Settings], argv: Sequence[str], prog: str) -> Settings:
    """`with_flags` for a bare entry point (a torchrun rank): any field as `--field-name VALUE`."""
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for name in cls.model_fields:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    return with_flags(cls, vars(parser.parse_args(argv)))
