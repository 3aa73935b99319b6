"""`cadence serve reward` settings: `CADENCE_*` variables on top of the common `ServiceSettings`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from cadence.settings import ServiceSettings


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
    strict_format: bool = False
    """Math: score 0 (`trailing_text`) a response that runs on past its last box (`CADENCE_STRICT_FORMAT`)."""
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
