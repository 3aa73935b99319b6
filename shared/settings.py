"""Settings from `CADENCE_*` environment variables: the one way processes read the environment.

The common base lives here (`CommonSettings`, `ServiceSettings`: where to listen, where Redis is); each
service's own class sits beside it, in `services/<name>/settings.py`. Command-line flags override what the
environment says (`with_flags`, `from_argv`). A required setting that is missing fails at start-up with
the variable's name.
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
