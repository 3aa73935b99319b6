"""`cadence serve broker [--store memory|DIR] [--retain N]`: the weight-sync broker as a process.

Opens the store (a directory store reloads and re-verifies what is on disk), serves `cadence.v1.Broker` with
health and reflection, exposes Prometheus metrics when `CADENCE_METRICS_PORT` is set, and on SIGTERM ends
every watch, lets fetches in flight finish within the grace period, and exits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cadence.broker.settings import BrokerSettings
from cadence.settings import default_port

if TYPE_CHECKING:
    from cadence.broker.server import BrokerServicer
    from cadence.grpc import ServiceServer

# Each watch and fetch holds a server thread for its whole stream; a few threads stay free for unary calls.
MAX_WORKERS = 64
MAX_STREAMS = 56


def build(settings: BrokerSettings) -> tuple[ServiceServer, BrokerServicer]:
    """The server (not started) and its servicer, for `serve` and for tests."""
    from cadence.broker.factory import open_store
    from cadence.broker.server import BrokerServicer, add_to_server
    from cadence.grpc import ServiceServer

    store = open_store(settings.store, settings.retain, settings.max_bytes, settings.memory_bytes, settings.spill_dir)
    servicer = BrokerServicer(store, max_streams=MAX_STREAMS)
    port = settings.grpc_port or default_port("broker")
    server = ServiceServer("broker", settings.host, port, max_workers=MAX_WORKERS)
    server.add_servicer(add_to_server, servicer, "cadence.v1.Broker")
    return server, servicer


def serve(settings: BrokerSettings) -> None:
    """Run the broker until SIGTERM/SIGINT."""
    from cadence.logging import get_logger, setup_logging
    from cadence.metrics import serve_metrics

    setup_logging("broker", settings.log_level, settings.log_format)
    server, servicer = build(settings)
    serve_metrics(settings.metrics_port, settings.host)
    port = server.start()
    get_logger(__name__).info("broker ready", extra={"port": port, "store": settings.store, "retain": settings.retain})
    server.wait_for_termination(on_term=servicer.close, grace=settings.grace_seconds)
