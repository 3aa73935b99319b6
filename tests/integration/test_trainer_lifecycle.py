"""A run's life on a cluster, played with `cadence serve trainer` as a real process (as the trainer pod runs
it): real Redis, a real broker, the real tiny model; a stand-in thread plays inference + reward.

- Two runs under one `CADENCE_RUN_DIR` (the chart's volume): run B starts at step 0, not at run A's checkpoint.
- A finished run stays finished: the trainer restarted in its folder (a StatefulSet restarts a container that
  exited 0) reports it done and idles, rewriting nothing, until it is stopped.
- Preemption: SIGTERM checkpoints at the step reached; SIGKILL loses at most the default checkpoint interval.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from cadence import streams
from cadence.errors import NotReady
from cadence.grpc import channel, wait_healthy
from cadence.net import free_port
from cadence.v1 import trainer_pb2, trainer_pb2_grpc

from .test_trainer_loop import Generator, broker_target  # noqa: F401  (the broker fixture)
from .test_trainer_service import clean_env, config_of

RESUMED = re.compile(r"resumed from checkpoint \S*/(step-\d+)")
# Timeouts allow for a 2-core machine shared by many jobs (load 20+), where a trainer's start took 2+ minutes.


class Trainer:
    """One `cadence serve trainer` process of run `run_id`, its output in a file."""

    def __init__(self, root: Path, config: dict[str, Any], redis_url: str, broker: str, name: str) -> None:
        self.root, self.run_id = root, config["run_id"]
        self.config_path = root.parent / f"{self.run_id}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root.parent / f"{name}.log"
        self.port = free_port()
        args = [sys.executable, "-m", "cadence.app.cli", "serve", "trainer", "--config", str(self.config_path)]
        args += ["--grpc-port", str(self.port), "--broker-addr", broker, "--redis-url", redis_url]
        args += ["--run-dir", str(root), "--host", "127.0.0.1"]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(args, env=clean_env(), stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def folder(self) -> Path:
        return self.root / self.run_id

    def output(self) -> str:
        return self.log_path.read_text()

    def ledger_steps(self) -> list[int]:
        path = self.folder / "ledger.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]

    def wait_for_steps(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ledger_steps()) < n:
            assert self.proc.poll() is None, f"trainer exited {self.proc.returncode}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {n} in {timeout}s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"trainer still running after {timeout}s:\n{self.output()[-3000:]}") from None
        self.log.close()
        return code

    def status(self, timeout: float = 300) -> trainer_pb2.TrainerStatus:
        deadline = time.monotonic() + timeout
        while True:  # a trainer that exits while starting fails the test at once, with its output
            assert self.proc.poll() is None, f"trainer exited {self.proc.returncode}:\n{self.output()[-3000:]}"
            try:
                wait_healthy(f"127.0.0.1:{self.port}", timeout=5)
                break
            except NotReady:
                assert time.monotonic() < deadline, f"not serving after {timeout}s:\n{self.output()[-3000:]}"
        with channel(f"127.0.0.1:{self.port}") as chan:
            return trainer_pb2_grpc.TrainerStub(chan).Status(trainer_pb2.TrainerStatusRequest())

    def resumed_from(self) -> str | None:
        found = RESUMED.search(self.output())
        return found.group(1) if found else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def start_trainer(
    redis_url: str,
    broker_target: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[Callable[..., Trainer]]:
    """`start_trainer(config, name)`: a trainer process of the config's run; every run of a test shares one
    CADENCE_RUN_DIR (`tmp_path/runs`, the chart's volume). Those still running at the end are killed."""
    started: list[Trainer] = []

    def start(config: dict[str, Any], name: str) -> Trainer:
        started.append(Trainer(tmp_path / "runs", config, redis_url, broker_target, name))
        return started[-1]

    yield start
    for trainer in started:
        trainer.kill()


@pytest.fixture
def generating(
    redis_url: str,
    broker_target: str,  # noqa: F811
    untrained_tiny_model_dir: Path,
) -> Callable[[str], AbstractContextManager[Generator]]:
    """`with generating(run_id):` the stand-in inference + reward answers the run's prompts."""
    tokenizer = AutoTokenizer.from_pretrained(untrained_tiny_model_dir)

    @contextmanager
    def run(run_id: str) -> Iterator[Generator]:
        generator = Generator(redis_url, run_id, broker_target, tokenizer)
        generator.start()
        try:
            yield generator
        finally:
            generator.stop()

    return run


@pytest.mark.slow  # two or three trainer starts: 1-2 min on 2 loaded cores
def test_the_next_run_starts_clean_after_a_stopped_run(
    start_trainer: Callable[..., Trainer],
    generating: Callable[[str], AbstractContextManager[Generator]],
    redis_url: str,
    untrained_tiny_model_dir: Path,
) -> None:
    """Run A is stopped as `cadence k8s stop` stops it (SIGTERM: checkpoint, exit 0); run B, submitted next
    into the same CADENCE_RUN_DIR, trains from step 0 in its own folder and leaves A's alone."""
    with generating("life-a"):
        a = start_trainer(config_of("life-a", untrained_tiny_model_dir, 200), "a")
        a.wait_for_steps(3)
        a.proc.send_signal(signal.SIGTERM)
        assert a.wait() == 0, a.output()[-3000:]
    stopped_at = len(a.ledger_steps())
    assert (a.folder / "checkpoints" / "latest").read_text() == f"step-{stopped_at}"
    with generating("life-b"):
        b = start_trainer(config_of("life-b", untrained_tiny_model_dir, 3), "b")
        assert b.wait() == 0, b.output()[-3000:]
    assert b.resumed_from() is None, "run B loaded a checkpoint: it resumed run A"
    assert b.ledger_steps() == [0, 1, 2]
    assert (b.folder / "final" / "config.json").exists()
    assert len(a.ledger_steps()) == stopped_at and not (a.folder / "final").exists(), "run B wrote into run A"
    meta_b = streams.read_meta(streams.connect(redis_url), "life-b")
    assert (meta_b["state"], meta_b["step"], meta_b["version"]) == ("done", "3", "3")


@pytest.mark.slow  # two or three trainer starts: 1-2 min on 2 loaded cores
def test_a_finished_run_stays_finished_across_trainer_restarts(
    start_trainer: Callable[..., Trainer],
    generating: Callable[[str], AbstractContextManager[Generator]],
    redis_url: str,
    untrained_tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """The trainer finishes (exit 0, `finished.json`); restarted twice, it reports the run done and idles,
    writing no final model, checkpoint, ledger line or meta step, and exits 0 when stopped. It loads nothing
    to idle: the restarts' model folder is gone (a trainer that loaded the model or DeepSpeed would fail)."""
    config = config_of("life-done", untrained_tiny_model_dir, 3)
    with generating("life-done"):
        first = start_trainer(config, "first")
        assert first.wait() == 0, first.output()[-3000:]
    folder = first.folder
    assert json.loads((folder / "finished.json").read_text())["step"] == 3
    written = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    without_model = config | {"model": {"path": str(tmp_path / "deleted-model")}}
    for attempt in ("second", "third"):
        again = start_trainer(without_model, attempt)
        status = again.status()
        assert (status.state, status.step, status.version) == ("done", 3, 3)
        time.sleep(1.0)
        assert again.proc.poll() is None, f"the restarted trainer exited:\n{again.output()[-3000:]}"
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(120) == 0, again.output()[-3000:]
        assert again.resumed_from() is None and "idle until stopped" in again.output()
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == written, "a restart rewrote files"
    meta = streams.read_meta(streams.connect(redis_url), "life-done")
    assert (meta["state"], meta["step"]) == ("done", "3")


@pytest.mark.slow  # two or three trainer starts: 1-2 min on 2 loaded cores
@pytest.mark.timeout(1200)
def test_a_preempted_trainer_resumes_near_where_it_stopped(
    start_trainer: Callable[..., Trainer],
    generating: Callable[[str], AbstractContextManager[Generator]],
    untrained_tiny_model_dir: Path,
) -> None:
    """No checkpoint_every in the config (the default: every steps/20 = 2 steps here). SIGTERM: the trainer
    checkpoints the step it reached and the restart resumes there; SIGKILL: the restart resumes at the last
    default checkpoint, not at 0 or the SIGTERM's step; every step is recorded once in the end."""
    config = config_of("life-preempt", untrained_tiny_model_dir, 40)
    with generating("life-preempt"):
        first = start_trainer(config, "first")
        first.wait_for_steps(3)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 0, first.output()[-3000:]
        terminated_at = len(first.ledger_steps())
        second = start_trainer(config, "second")
        second.wait_for_steps(terminated_at + 5)
        second.kill()
        killed_at = len(second.ledger_steps())
        third = start_trainer(config, "third")
        assert third.wait(600) == 0, third.output()[-3000:]
    assert second.resumed_from() == f"step-{terminated_at}"
    resumed = int((third.resumed_from() or "step-0").removeprefix("step-"))
    assert resumed % 2 == 0 and killed_at - 2 <= resumed <= killed_at, (terminated_at, killed_at, resumed)
    assert third.ledger_steps() == list(range(40))
