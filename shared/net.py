"""Small networking helpers shared by the local launcher and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (a local run picks its service ports this way)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
