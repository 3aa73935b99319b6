"""Prometheus helpers. Services define their metrics at module level with prometheus_client; this serves them."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, start_http_server

__all__ = ["CONTENT_TYPE_LATEST", "metrics_text", "serve_metrics"]

_started: set[int] = set()


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Expose `/metrics` on its own port (idempotent per port; 0 does nothing)."""
    if port and port not in _started:
        start_http_server(port, addr=host)
        _started.add(port)


def metrics_text() -> bytes:
    """The current metrics in Prometheus text format (for HTTP services that mount `/metrics`)."""
    return generate_latest(REGISTRY)
