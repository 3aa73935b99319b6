"""Small networking helpers shared by the local launcher and the tests."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The range the kernel draws outgoing connections' local ports from (Linux default 32768–60999)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now and unlikely to be taken before a child process binds it.

    A local run picks its service ports here and hands them to child processes, so there is a window
    between this check and the bind. A port from `bind(0)` lies in the ephemeral range, where every
    outgoing connection (to Redis, to another service) also takes its local port: under load one of
    them takes it in that window ("address already in use"). So ports come from below that range, at
    random, and never twice from one process.
    """
    low, _ = ephemeral_range()
    below = low - LOWEST_PORT >= 1_000  # else (an unusual kernel setting) any free port has to do
    with _lock:
        for _ in range(200):
            port = _bind_probe(host, random.randrange(LOWEST_PORT, low) if below else 0)
            if port and port not in _handed_out:
                _handed_out.add(port)
                return port
    raise OSError(f"no free TCP port found on {host} between {LOWEST_PORT} and {low}; free some ports")


def reachable_host(host: str = "") -> str:
    """`host`, or for a wildcard bind (or none) this host's address (a pod's IP in Kubernetes)."""
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return host
    return socket.gethostbyname(socket.gethostname())


def _bind_probe(host: str, port: int) -> int:
    """The bound port when `port` can be bound on `host` now (0: any free port), else 0."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return 0
        return sock.getsockname()[1]
