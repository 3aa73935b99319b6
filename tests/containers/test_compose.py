"""The compose CPU profile as real containers: Redis (AOF), broker, reward, inference and the trainer, started in
the order `depends_on: service_healthy` gives, hardened as the chart runs them, training a toy run end to end with
the seed evaluated before and the trained model after; `down -v` leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cadence.net import free_port

from .conftest import REPO, TAG, Engine, record

PROJECT = "cadence-containers-test"
RUN_ID = "compose-toy"
# Writable paths per service: the chart's mounts (emptyDirs and volumes); everything else is read-only.
CHART_WRITABLE = {
    "broker": {"/tmp", "/var/cache/cadence"},
    "reward": {"/tmp", "/var/cache/cadence"},
    "inference-cpu": {"/tmp", "/var/cache/cadence", "/dev/shm"},
    "trainer-cpu": {"/tmp", "/var/cache/cadence", "/dev/shm", "/var/lib/cadence/runs"},
}
# Short enough for a container run, at the learning rate where s = 4 gains early: in bench.sweep (2026-12-02) s = 4 at
# 1.5e-4 went 29 → 41 % by step 32, while at the config's 5e-4 it first dips (29 → 15.5 % at step 16). A 64-step run at
# 5e-4 with 16 prompts a step ended below its seed here (28.5 → 21.5 %).
TOY = {"steps": 48, "batch_prompts": 32, "optimizer": {"lr": 1.5e-4}, "eval": {"max_problems": 200}}
TOY_CONFIG = yaml.safe_load((REPO / "configs" / "toy-semi-online-dpo.yaml").read_text())
# The run's own answer length (the tiny model's context is 64 tokens: `cadence eval`'s default 64 does not fit).
ANSWER_TOKENS = str(TOY_CONFIG["sampling"]["max_tokens"])
EVAL = [
    *("eval", "--dataset", "toy", "--split", "test", "--limit", "200", "--engine", "hf"),
    *("--max-tokens", ANSWER_TOKENS),
]


class Compose:
    """Debian's docker-compose on this engine (podman: through its Docker-compatible socket)."""

    def __init__(self, engine: Engine, env: dict[str, str]) -> None:
        binary = shutil.which("docker-compose")
        assert binary, "docker-compose is missing: apt-get install -y --no-install-recommends docker-compose"
        self.engine = engine
        self.base = [binary, "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"), "--profile", "cpu"]
        clean = {k: v for k, v in engine.env.items() if not k.startswith("CADENCE_")}
        self.env = {**clean, **env}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        ids = self("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine("inspect", self.container(service)).stdout)[0]

    def eval_json(self, model: str) -> dict:
        """`cadence eval` in a one-off trainer container (the same hardening and volumes); its JSON summary."""
        out = self("run", "--rm", "--no-deps", "--entrypoint", "cadence", "trainer-cpu", *EVAL, "--model", model).stdout
        return json.loads(out[out.rindex("\n{") :])


def _writable_mounts(info: dict) -> set[str]:
    mounts = {m["Destination"] for m in info["Mounts"] if m.get("RW", True)}
    return mounts | set(info["HostConfig"].get("Tmpfs") or {})


def _assert_hardened(compose: Compose, service: str) -> None:
    info = compose.inspect(service)
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True and info["Config"]["User"] == "10001:10001", service
    assert any("no-new-privileges" in o for o in host["SecurityOpt"] or []), service
    # Every runtime, Kubernetes included, gives a container its own /dev/shm tmpfs (64 MiB unless a chart mounts a
    # larger one). podman's --read-only also mounts empty tmpfs on /run and /var/tmp (Docker and Kubernetes do not):
    # allowed here, and PROBE checks that nothing wrote to /var/tmp.
    extra = {"/dev/shm"} | ({"/run", "/var/tmp"} if compose.engine.name == "podman" else set())
    assert _writable_mounts(info) <= CHART_WRITABLE[service] | extra, (service, _writable_mounts(info))
    container = compose.container(service)
    if service != "trainer-cpu" or info["State"]["Running"]:
        compose.engine("exec", container, "sh", "-c", PROBE)


# Inside: no capability at all, the chart's writable paths writable, the image itself not.
PROBE = (
    "grep -q 'CapEff:[[:space:]]*0000000000000000' /proc/self/status && touch /tmp/w /var/cache/cadence/w"
    " && ! touch /opt/cadence/w 2>/dev/null && ! touch /var/lib/cadence/w 2>/dev/null"
    ' && [ -z "$(ls -A /var/tmp)" ]'
)


def _health(compose: Compose, service: str) -> str:
    return compose.inspect(service)["State"]["Health"]["Status"]


@pytest.fixture
def compose(engine: Engine, images: dict[str, str], redis_image: str, tmp_path: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    config = {**TOY_CONFIG, **{k: v for k, v in TOY.items() if k not in ("eval", "optimizer")}}
    config["eval"] = {**TOY_CONFIG["eval"], **TOY["eval"]}
    config["optimizer"] = {**TOY_CONFIG["optimizer"], **TOY["optimizer"]}
    (configs / "toy.yaml").write_text(yaml.safe_dump(config))
    os.chmod(configs, 0o755)
    env = {
        "CADENCE_RUN_ID": RUN_ID,
        "CADENCE_RUN_CONFIG": "toy.yaml",
        "CADENCE_CONFIGS_DIR": str(configs),
        "CADENCE_TAG": TAG,
        "CADENCE_REDIS_IMAGE": redis_image,
        "CADENCE_REWARD_HTTP_PORT": str(free_port()),
        "CADENCE_REWARD_GRPC_PORT": str(free_port()),
    }
    stack = Compose(engine, env)
    # Leftovers of an aborted run go, except the seed-model cache (`cadence-home`), which is only a cache.
    stack("down", "--remove-orphans", check=False)
    engine("volume", "rm", "-f", f"{PROJECT}_cadence-runs", f"{PROJECT}_redis-data", check=False)
    try:
        yield stack
    finally:
        print(stack("logs", "--no-color", "--tail", "30", check=False).stdout)  # shown when the test fails
        stack("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)


@pytest.mark.timeout(7200)  # builds the images on first use, then a whole toy run
def test_compose_cpu_profile_trains_a_toy_run(compose: Compose, engine: Engine) -> None:
    started = time.monotonic()
    compose("up", "-d", "--no-build", timeout=3000)  # returns once the trainer started: every dependency healthy
    up_seconds = time.monotonic() - started
    for service in ("broker", "reward", "inference-cpu"):
        assert _health(compose, service) == "healthy", service
        _assert_hardened(compose, service)
    _assert_hardened(compose, "trainer-cpu")
    redis = compose.container("redis")
    assert engine("exec", redis, "redis-cli", "config", "get", "appendonly").stdout.split() == ["appendonly", "yes"]

    trainer = compose.container("trainer-cpu")
    deadline = time.monotonic() + 3600
    while engine("inspect", trainer, "--format", "{{.State.Running}}").stdout.strip() == "true":
        assert time.monotonic() < deadline, "the toy run did not finish in an hour"
        time.sleep(5)
    train_seconds = time.monotonic() - started
    code = engine("inspect", trainer, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert code == "0", compose("logs", "--no-color", "--tail", "80", "trainer-cpu").stdout

    before = compose.eval_json("tiny")
    run_dir = f"/var/lib/cadence/runs/{RUN_ID}"  # the trainer's CADENCE_RUN_DIR is the root of the run folders
    after = compose.eval_json(f"{run_dir}/final")
    metrics = compose(
        "run", "--rm", "--no-deps", "--entrypoint", "cat", "trainer-cpu", f"{run_dir}/metrics.jsonl"
    ).stdout.splitlines()
    assert len([line for line in metrics if line.startswith("{")]) >= TOY["steps"] // 2
    assert before["problems"] == after["problems"] == TOY["eval"]["max_problems"]
    assert after["accuracy"] > before["accuracy"], (before, after)
    record(
        compose_up_seconds=round(up_seconds),
        compose_run_seconds=round(train_seconds),
        toy_steps=TOY["steps"],
        accuracy_before=before["accuracy"],
        accuracy_after=after["accuracy"],
        eval_problems=after["problems"],
    )

    compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert engine("ps", "-a", "-q", "--filter", label).stdout.split() == [], "down left containers"
    assert engine("volume", "ls", "-q", "--filter", label).stdout.split() == [], "down -v left volumes"
    assert PROJECT not in engine("network", "ls", "--format", "{{.Name}}").stdout, "down left the network"
