"""The containers tier (`make test-containers`): the CPU images built and run as real containers.

Not part of `make test`: the tests here are collected only with CADENCE_CONTAINER_TESTS=1 (the make target
sets it), and skip when neither a Docker daemon nor podman is there. With podman, the Docker-compatible
API (`podman system service`) serves Debian's docker-compose, and a machine without systemd gets its
health checks run by `HealthTicker` (podman schedules them with systemd timers, which are missing there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TAG = "containers-test"
LOCAL_BASE = "localhost/cadence-base:bookworm"
LOCAL_REDIS = "localhost/cadence-test-redis:bookworm"
FIGURES = REPO / ".cache" / "containers-figures.json"

if not os.environ.get("CADENCE_CONTAINER_TESTS"):
    collect_ignore_glob = ["test_*.py"]


def _answers(*command: str) -> bool:
    return shutil.which(command[0]) is not None and subprocess.run(command, capture_output=True).returncode == 0


def record(**figures: object) -> None:
    """Keep a measured figure for the README (.cache/containers-figures.json)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps({**known, **figures}, indent=2))


@dataclass
class Engine:
    """docker or podman, and the environment its CLI and docker-compose need."""

    name: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def has_image(self, image: str) -> bool:
        return self("image", "inspect", image, check=False).returncode == 0


class HealthTicker(threading.Thread):
    """Runs each starting or unhealthy container's own HEALTHCHECK at its own interval, as podman's systemd
    timers would (podman still applies the start period and the retries)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="health-ticker", daemon=True)
        self.engine, self.stopped = engine, threading.Event()
        self.interval: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def _interval(self, container: str) -> float:
        if container not in self.interval:
            info = json.loads(self.engine("inspect", container, check=False).stdout or "[{}]")[0]
            check = (info.get("Config") or {}).get("Healthcheck") or {}
            self.interval[container] = (check.get("Interval") or 30e9) / 1e9
        return self.interval[container]

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            ids = self.engine("ps", "-q", "--filter", "health=starting", check=False).stdout.split()
            ids += self.engine("ps", "-q", "--filter", "health=unhealthy", check=False).stdout.split()
            for container in ids:
                if time.monotonic() - self.last.get(container, 0.0) >= self._interval(container):
                    self.last[container] = time.monotonic()
                    self.engine("healthcheck", "run", container, check=False, timeout=60)


def _podman_conf(root: Path) -> Path:
    """containers.conf for sandboxes: runc where crun is refused, and limits low enough to be granted."""
    lines = ["[containers]", 'default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]']
    if shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
    path = root / "containers.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    if _answers("docker", "info"):
        yield Engine("docker")
        return
    if not shutil.which("podman"):
        pytest.skip("no container engine: neither a Docker daemon nor podman (apt-get install -y podman)")
    root = Path(tempfile.mkdtemp(prefix="cadence-podman-"))
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(_podman_conf(root)))}
    if not _answers("podman", "info"):
        pytest.skip("podman is installed but does not answer `podman info`")
    socket = root / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"], env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    podman = Engine("podman", {**env, "DOCKER_HOST": f"unix://{socket}"})
    ticker = HealthTicker(podman) if not Path("/run/systemd/private").exists() else None
    if ticker:
        ticker.start()
    try:
        yield podman
    finally:
        if ticker:
            ticker.stopped.set()
        service.terminate()
        service.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _pip_config(key: str) -> str:
    done = subprocess.run(["pip", "config", "get", key], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


@pytest.fixture(scope="session")
def build_settings(engine: Engine) -> dict[str, str]:
    """make variables for this machine: a local Debian base where no registry is reachable, the host's
    CA bundle and local wheel folder (the CPU torch wheel), host networking for pip."""
    settings = {"IMAGE_TAG": TAG, "ENGINE": engine.name, "BUILD_FLAGS": "--network host"}
    if engine.name == "podman" and shutil.which("debootstrap"):
        if not engine.has_image(LOCAL_BASE):
            subprocess.run(["make", "-s", "base-image", "ENGINE=podman"], cwd=REPO, env=engine.env, check=True)
        settings["BASE_IMAGE"] = LOCAL_BASE
    cert = _pip_config("global.cert") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        settings["PIP_CERT"] = cert
    wheels = _pip_config("global.find-links")
    if wheels and Path(wheels).is_dir():
        settings["WHEELHOUSE"] = wheels
        if any(Path(wheels).glob("torch-*+cpu-*.whl")):
            settings["TORCH_INDEX"] = "https://pypi.org/simple"  # the +cpu wheel is in the wheel folder
    return settings


@pytest.fixture(scope="session")
def images(engine: Engine, build_settings: dict[str, str]) -> dict[str, str]:
    """`make images` (CPU): service → image; build time and sizes are recorded."""
    started = time.monotonic()
    done = subprocess.run(
        ["make", "-s", "images", *(f"{k}={v}" for k, v in build_settings.items())],
        cwd=REPO,
        env=engine.env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    built = {s: f"cadence-{s}:{TAG}" for s in ("broker", "reward", "inference", "trainer")}
    sizes = {}
    for service, image in built.items():
        size = engine("image", "inspect", image, "--format", "{{.Size}}").stdout.strip()
        sizes[service] = f"{int(size) / 1e9:.2f} GB"
    record(build_seconds=round(time.monotonic() - started), image_sizes=sizes, engine=engine.name)
    return built


@pytest.fixture(scope="session")
def redis_image(engine: Engine, build_settings: dict[str, str]) -> str:
    """Redis for the stack: the official image where a registry answers, else Debian's redis-server."""
    if "BASE_IMAGE" not in build_settings:
        return "redis:7.4.2-alpine"
    if not engine.has_image(LOCAL_REDIS):
        engine(
            "build", "--network", "host", "--build-arg", f"BASE_IMAGE={build_settings['BASE_IMAGE']}",
            "-t", LOCAL_REDIS, "-f", str(HERE / "redis.Dockerfile"), str(HERE),
            timeout=900,
        )  # fmt: skip
    return LOCAL_REDIS
