"""Ports for child services: free, outside the kernel's ephemeral range, never handed out twice."""

from __future__ import annotations

import socket

import pytest

from cadence import net
from cadence.net import LOWEST_PORT, ephemeral_range, free_port


def test_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low - LOWEST_PORT >= 1_000:  # else the kernel leaves no room below its range and any free port will do
        assert all(LOWEST_PORT <= port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    low, _ = ephemeral_range()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0 if low - LOWEST_PORT < 1_000 else low - 1))
        taken = listener.getsockname()[1]
        draws = iter([taken, taken, *range(LOWEST_PORT, LOWEST_PORT + 300)])
        monkeypatch.setattr(net.random, "randrange", lambda *_: next(draws))
        port = free_port()
    assert port != taken


def test_without_room_below_the_ephemeral_range_any_free_port_is_used_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "ephemeral_range", lambda: (1024, 65535))
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
