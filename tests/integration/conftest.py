"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cadence.broker.main import build
from cadence.broker.settings import BrokerSettings
from cadence.net import free_port


@pytest.fixture
def broker() -> Iterator[str]:
    """A real broker on loopback (in-memory store, two versions kept); yields its address."""
    server, servicer = build(BrokerSettings(host="127.0.0.1", grpc_port=free_port(), store="memory", retain=2))
    port = server.start()
    yield f"127.0.0.1:{port}"
    servicer.close()
    server.stop(0.5)
