"""The broker as a real process (`cadence serve broker`) under faults: TCP connections cut mid-publish and
mid-fetch by a loopback proxy, SIGTERM with watchers attached, and a restart on the same directory store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from cadence import errors
from cadence.clients import BrokerClient
from cadence.grpc import channel, wait_healthy
from cadence.net import free_port
from cadence.v1 import broker_pb2, broker_pb2_grpc

torch.set_num_threads(1)
RUN = "run-f"


class CuttingProxy:
    """Forwards loopback TCP to `port`; on its first connection, once `cut_after` bytes went `direction`,
    cuts it, or with `flip=True` flips that byte (damage that TCP's checksums would not see) and goes on."""

    def __init__(self, port: int, cut_after: int, direction: str, flip: bool = False) -> None:
        self.port, self.cut_after, self.direction, self.flip = port, cut_after, direction, flip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            budget = self.cut_after if self.cuts == 0 else None
            self.cuts += 1
            pair = (client, upstream)
            threading.Thread(
                target=self._pump,
                args=(client, upstream, budget if self.direction == "up" else None, pair),
                daemon=True,
            ).start()
            threading.Thread(
                target=self._pump,
                args=(upstream, client, budget if self.direction == "down" else None, pair),
                daemon=True,
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, budget: int | None, pair: tuple[socket.socket, ...]
    ) -> None:
        sent = 0
        try:
            while budget is None or sent < budget:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and self.flip and sent <= budget < sent + len(data):
                    data = bytearray(data)
                    data[budget - sent] ^= 0xFF
                    budget = None
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in pair:  # a cut (or a normal close) drops both sides, like a dead link or pod
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


class BrokerProcess:
    def __init__(self, store: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = {**os.environ, "CADENCE_METRICS_PORT": str(self.metrics_port), "CADENCE_GRACE_SECONDS": "3"}
        args = [sys.executable, "-m", "cadence.app.cli", "serve", "broker", "--host", "127.0.0.1"]
        args += ["--grpc-port", str(self.port), "--store", store, "--retain", "2"]
        self.proc = subprocess.Popen(args, env=env)
        wait_healthy(self.target, timeout=30)

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else 0.0

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "weights"


@pytest.fixture
def broker(store_dir: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(str(store_dir))
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(5)


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(2_500_000, generator=gen),
        "b": torch.randn(1_000_000, generator=gen).to(torch.bfloat16),
        "c": torch.randn(2_000_000, generator=gen),
    }


def bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in want.items()
    )


def test_fetch_resumes_after_the_connection_drops(broker: BrokerProcess) -> None:
    weights = state(1)
    with BrokerClient(broker.target, RUN) as direct:
        info = direct.publish(weights, version=1)
    proxy = CuttingProxy(broker.port, cut_after=info.total_bytes // 2, direction="down")
    try:
        with BrokerClient(proxy.address, RUN, backoff=0.05) as client:
            assert bit_exact(client.fetch(1), weights)
    finally:
        proxy.close()
    assert proxy.cuts >= 2  # the cut connection and the one the fetch resumed on
    assert broker.metric("cadence_broker_fetch_resumes_total") == 1
    sent = broker.metric("cadence_broker_bytes_out_total")
    assert info.total_bytes <= sent < 1.6 * info.total_bytes  # resumed from a chunk, not from scratch


@pytest.mark.parametrize("where", ["middle", "last chunk"])
def test_a_chunk_damaged_in_transit_is_refused_and_fetched_again(broker: BrokerProcess, where: str) -> None:
    """Verification is pipelined: damage in the last chunk is only found when the fetch finishes."""
    weights = state(4)
    with BrokerClient(broker.target, RUN) as direct:
        info = direct.publish(weights, version=4)
    damaged_at = info.total_bytes // 2 + 12345 if where == "middle" else info.total_bytes - 1000
    proxy = CuttingProxy(broker.port, cut_after=damaged_at, direction="down", flip=True)
    try:
        with BrokerClient(proxy.address, RUN, backoff=0.05) as client:
            assert bit_exact(client.fetch(4), weights)
    finally:
        proxy.close()
    assert broker.metric("cadence_broker_fetch_resumes_total") == 1


def test_publisher_cut_midway_leaves_nothing_visible(broker: BrokerProcess) -> None:
    weights = state(2)
    proxy = CuttingProxy(broker.port, cut_after=12 * 1024 * 1024, direction="up")
    try:
        with BrokerClient(proxy.address, RUN, retries=0) as client, pytest.raises(errors.CadenceError):
            client.publish(weights, version=2)
        with BrokerClient(broker.target, RUN) as direct:
            assert direct.latest() is None
            status = direct.status()
            assert list(status.versions) == [] and status.stored_bytes == 0
        with BrokerClient(proxy.address, RUN) as client:  # the new connection is not cut: publish works
            assert client.publish(weights, version=2).version == 2
    finally:
        proxy.close()


def test_sigterm_ends_watchers_and_a_restart_reloads_the_directory(broker: BrokerProcess, store_dir: Path) -> None:
    weights = state(3)
    with BrokerClient(broker.target, RUN) as client:
        client.publish(weights, version=3)
    with channel(broker.target) as chan:
        watch = broker_pb2_grpc.BrokerStub(chan).Watch(broker_pb2.WatchRequest(run_id=RUN, after_version=-1))
        assert next(watch).version == 3
        started = time.monotonic()
        assert broker.terminate() == 0
        assert list(watch) == [] and watch.code() == grpc.StatusCode.OK  # ended cleanly, not cut
        assert time.monotonic() - started < 3  # did not wait out the grace period
    restarted = BrokerProcess(str(store_dir))
    try:
        with BrokerClient(restarted.target, RUN) as client:
            assert client.latest().version == 3
            assert bit_exact(client.fetch(3), weights)
            with pytest.raises(errors.Conflict, match="not newer than the latest, 3"):
                client.publish(weights, version=2)
    finally:
        assert restarted.terminate() == 0
