"""`cadence run` in local mode: Redis, broker, reward, N inference workers and the trainer as child processes.

The launcher owns nothing of the algorithm: it resolves the config and the model, evaluates the seed,
starts the services (each logging to `runs/<run_id>/logs/<service>.log`), waits for their health checks,
shows progress from the trainer's metrics, stops everything cleanly, evaluates the result and writes the
report. A service that dies stops the run with its last log lines and a non-zero exit.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cadence.app.supervisor import Child, Supervisor
from cadence.config import RunConfig, dump_run_config
from cadence.errors import CadenceError, NotReady
from cadence.net import free_port
from cadence.paths import run_folder
from cadence.trainer.schedule import Schedule

SERVICES = ("broker", "reward", "inference", "trainer")
LOCAL_REDIS_MAXMEMORY = "1gb"
"""The private Redis's ceiling; the trainer trims finished stream entries at every checkpoint."""


@dataclass
class RunPlan:
    """Everything a local run decides before it starts a process."""

    config: RunConfig
    run_dir: Path
    engine: str
    redis_url: str = ""
    """Empty: start a private redis-server; else use this one (`CADENCE_REDIS_URL`)."""
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.config.run_id


def make_plan(config: RunConfig, runs_root: Path, redis_url: str = "", engine: str | None = None) -> RunPlan:
    """Give the run a unique id and folder, choose the engine and free ports."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = config.model_copy(update={"run_id": f"{config.run_id or 'run'}-{stamp}"})
    from cadence.app.wiring import engine_kind

    chosen = engine_kind(engine or config.inference.engine)
    ports = {name: free_port() for name in SERVICES}
    ports["reward_http"] = free_port()
    for index in range(config.inference.workers):
        ports[f"inference{index}"] = free_port()
    return RunPlan(config, run_folder(runs_root, config.run_id), chosen, redis_url, ports)


def describe(plan: RunPlan) -> str:
    """The resolved plan, for `--dry-run` and the top of the log."""
    config = plan.config
    regime = "offline" if config.offline else ("online" if config.sync_every == 1 else "semi-online")
    ref = Schedule.of(config).ref_sync_every
    lines = [
        f"run            {plan.run_id}",
        f"folder         {plan.run_dir}",
        f"algorithm      {config.algorithm.type} ({regime}, sync_every={config.sync_every}, "
        f"ref_sync_every={'fixed seed' if ref is None else ref}, async_lag={config.async_lag})",
        f"model          {config.model.path}",
        f"tasks          {', '.join(f'{t.name}:{t.kind}:{t.dataset}×{t.weight:g}' for t in config.tasks)}",
        f"math scoring   {'strict (text after the last box scores 0)' if config.strict_format else 'lenient'}",
        f"steps          {config.steps} × {config.batch_prompts} prompts × {config.sampling.n} samples",
        f"engine         {plan.engine} × {config.inference.workers} worker(s)",
        f"redis          {plan.redis_url or 'private redis-server on a free port'}",
        f"eval           {config.eval.dataset}/{config.eval.split} k={config.eval.samples} T={config.eval.temperature}",
    ]
    return "\n".join(lines)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cadence.app.cli", *map(str, args)]


class LocalRun:
    """One local run's processes."""

    not_waited_for: tuple[str, ...] = ("redis",)
    """Services `start` does not wait on a health check for (Redis has no gRPC health service)."""

    def __init__(self, plan: RunPlan, model_dir: str, reward_model: str = "") -> None:
        self.plan = plan
        self.model_dir = model_dir
        self.reward_model = reward_model
        self.logs = plan.run_dir / "logs"
        self.supervisor = Supervisor(self.logs, env=self._env())

    def _env(self) -> dict[str, str]:
        return {
            "CADENCE_RUN_ID": self.plan.run_id,
            "CADENCE_BROKER_ADDR": f"127.0.0.1:{self.plan.ports['broker']}",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        """Start every service and wait until each answers its health check."""
        plan, ports = self.plan, self.plan.ports
        if not plan.redis_url:
            plan.redis_url = self._start_redis()
        self.supervisor.env["CADENCE_REDIS_URL"] = plan.redis_url
        config_path = plan.run_dir / "config.yaml"
        self.supervisor.start("broker", _cli("serve", "broker", "--host", "127.0.0.1", "--grpc-port", ports["broker"]))
        reward_args = ["--host", "127.0.0.1", "--grpc-port", ports["reward"], "--http-port", ports["reward_http"]]
        if self.reward_model:
            reward_args += ["--reward-model", self.reward_model]
        strict = {"CADENCE_STRICT_FORMAT": "1"} if plan.config.strict_format else None
        self.supervisor.start("reward", _cli("serve", "reward", *reward_args), env=strict)
        for index in range(plan.config.inference.workers):
            self.supervisor.start(
                f"inference{index}",
                _cli(
                    "serve",
                    "inference",
                    "--host",
                    "127.0.0.1",
                    "--grpc-port",
                    ports[f"inference{index}"],
                    "--engine",
                    plan.engine,
                    "--model",
                    self.model_dir,
                ),
            )
        self.supervisor.start(
            "trainer",
            _cli(
                "serve",
                "trainer",
                "--config",
                config_path,
                "--run-dir",
                plan.run_dir.parent,  # the runs root: the trainer works in <root>/<run_id>
                "--host",
                "127.0.0.1",
                "--grpc-port",
                ports["trainer"],
            ),
        )
        self._wait_healthy()

    def _start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise NotReady("redis-server is not installed: run `make setup` or `apt-get install -y redis-server`")
        port = free_port()
        data = self.plan.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.supervisor.start(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--maxmemory",  # full: refuse writes (the writer fails loudly), never evict queued work
                LOCAL_REDIS_MAXMEMORY,
                "--maxmemory-policy",
                "noeviction",
            ],
        )
        return f"redis://127.0.0.1:{port}/0"

    def _wait_healthy(self, timeout: float = 600.0) -> None:
        from cadence.grpc import wait_healthy

        deadline = time.monotonic() + timeout
        for child in [c for c in self.supervisor.children if c.name not in self.not_waited_for]:
            while not (child.name == "trainer" and child.returncode == 0):  # a short run may finish first
                self.raise_if_failed()
                try:
                    wait_healthy(f"127.0.0.1:{self._port_of(child.name)}", timeout=2.0)
                    break
                except NotReady:
                    if time.monotonic() > deadline:
                        raise NotReady(f"{child.name} not healthy after {timeout:.0f}s; see {child.log_path}") from None

    def _port_of(self, name: str) -> int:
        return self.plan.ports[name]

    def raise_if_failed(self, ignore: tuple[str, ...] = ()) -> None:
        """Stop the run when any service died, showing that service's last log lines.

        The trainer exiting with 0 is the run finishing, not a failure.
        """
        finished = ("trainer",) if self.trainer().returncode == 0 else ()
        dead = self.supervisor.first_failure(ignore=(*ignore, *finished))
        if dead is not None:
            raise ServiceFailed(dead)

    def trainer(self) -> Child:
        return next(c for c in self.supervisor.children if c.name == "trainer")

    def stop(self) -> None:
        """Services first, Redis last: a service draining while Redis is gone would wait out its grace period."""
        self.supervisor.stop_all(last=("redis",))


class ServiceFailed(CadenceError):
    """A service of the run exited; the message carries its last log lines."""

    def __init__(self, child: Child) -> None:
        super().__init__(
            f"{child.name} exited with code {child.returncode}; last lines of {child.log_path}:\n{child.tail(25)}"
        )
        self.child = child


def read_metrics(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete JSON lines of the trainer's metrics file since byte `offset`."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def evaluate_model(plan: RunPlan, model_dir: str, out_name: str) -> dict:
    """Evaluate `model_dir` on the run's eval set; write `<out_name>.json` and its per-problem JSONL."""
    from cadence.app.wiring import run_eval

    spec = plan.config.eval
    spec = spec.model_copy(update={"engine": plan.engine if spec.engine == "auto" else spec.engine})
    max_tokens = spec.max_tokens or plan.config.sampling.max_tokens
    summary = run_eval(
        spec, model_dir, seed=plan.config.seed, max_tokens=max_tokens, out=plan.run_dir / f"{out_name}.jsonl"
    )
    result = summary.to_json()
    (plan.run_dir / f"{out_name}.json").write_text(json.dumps(result, indent=2))
    return result


def follow(run: LocalRun, console, poll_seconds: float = 0.5) -> None:
    """Show progress until the trainer exits; raise `ServiceFailed` if any service dies first."""
    from cadence.app.progress import RunView

    metrics_path = run.plan.run_dir / "metrics.jsonl"
    offset = 0
    with RunView(console, run.plan.config.steps) as view:
        while True:
            rows, offset = read_metrics(metrics_path, offset)
            view.update(rows, run.supervisor.children)
            trainer = run.trainer()
            if not trainer.alive:
                if trainer.returncode != 0:
                    raise ServiceFailed(trainer)
                rows, offset = read_metrics(metrics_path, offset)
                view.update(rows, run.supervisor.children)
                return
            run.raise_if_failed(ignore=("trainer",))
            time.sleep(poll_seconds)


def run_local(plan: RunPlan, console, keep: bool = False) -> int:
    """A whole local run: seed eval, services, training with progress, final eval, report. Returns the exit code."""
    from cadence.models import resolve_model

    plan.run_dir.mkdir(parents=True, exist_ok=False)
    (plan.run_dir / "config.yaml").write_text(dump_run_config(plan.config))
    console.print(describe(plan))
    model_dir = str(resolve_model(plan.config.model.path))
    reward_model = str(resolve_model(plan.config.reward_model)) if plan.config.reward_model else ""
    math_eval = plan.config.eval.dataset not in ("alpaca_eval", "arena_hard")
    if math_eval:
        console.print("[bold]evaluating the seed model…")
        before = evaluate_model(plan, model_dir, "eval_before")
        console.print(f"seed accuracy: {before['accuracy']:.1%} on {before['problems']} held-out problems")
    run = LocalRun(plan, model_dir, reward_model)
    code = 0
    started = time.monotonic()
    try:
        console.print("[bold]starting services…")
        run.start()
        follow(run, console)
        console.print()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every service")
        code = 130
    except ServiceFailed as failure:
        console.print(f"[red]{failure}")
        code = 1
    finally:
        run.stop()
        if not keep:
            shutil.rmtree(plan.run_dir / "redis", ignore_errors=True)
    console.print(f"training finished in {time.monotonic() - started:.0f}s" if code == 0 else "run stopped")
    final_dir = plan.run_dir / "final"
    if code == 0 and math_eval and final_dir.exists():
        console.print("[bold]evaluating the trained model…")
        after = evaluate_model(plan, str(final_dir), "eval_after")
        console.print(_before_after_table(before, after))
    from cadence.app.report import write_report

    console.print(f"report: {write_report(plan.run_dir)}")
    return code


def _before_after_table(before: dict, after: dict):
    from rich.table import Table

    table = Table(title="held-out accuracy")
    for column in ("model", "problems", "k", "accuracy", "mean length"):
        table.add_column(column)
    for name, result in (("seed", before), ("trained", after)):
        table.add_row(
            name,
            str(result["problems"]),
            str(result["samples"]),
            f"{result['accuracy']:.1%}",
            f"{result['mean_length']:.1f}",
        )
    table.caption = f"change: {100 * (after['accuracy'] - before['accuracy']):+.1f} points"
    return table
