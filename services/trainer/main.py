"""`cadence serve trainer --config RUN.yaml`: feeder + training loop + gRPC Trainer service.

Multi-process (ZeRO across processes or GPUs): launch the same entry point once per rank,
`torchrun --nproc-per-node N -m cadence.trainer.main --config RUN.yaml` (or
`deepspeed --no_local_rank --module cadence.trainer.main --config RUN.yaml`: the rank comes from the
environment, so the launcher must not append `--local_rank`). Rank 0 reads the streams, publishes
weights and serves gRPC; the other ranks follow its plans. torch is imported only inside `serve`, so
`--help` stays instant.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from cadence.config import RunConfig, dump_run_config, load_run_config
from cadence.errors import ConfigError, exit_on_error
from cadence.logging import get_logger, setup_logging
from cadence.paths import run_folder
from cadence.settings import default_port, from_argv
from cadence.trainer.settings import TrainerSettings

log = get_logger(__name__)


def _load(settings: TrainerSettings) -> tuple[RunConfig, str, TrainerSettings]:
    """The run: from --config, or (without one) the next run submitted with `cadence run --attach`. Its folder
    is `<run_dir>/<run_id>` either way (`CADENCE_RUN_DIR` is the root of every run's folder)."""
    if settings.config is None:
        return _claim_submission(settings)
    config = load_run_config(settings.config)
    run_id = settings.run_id or config.run_id
    if not run_id:
        raise ConfigError("no run id: set run_id in the config or CADENCE_RUN_ID")
    return config, run_id, settings.model_copy(update={"run_dir": run_folder(settings.run_dir, run_id)})


def _claim_submission(settings: TrainerSettings) -> tuple[RunConfig, str, TrainerSettings]:
    """Wait for a submitted run. Rank 0 only (ranks > 0 need --config)."""
    from cadence import runs, streams

    if int(os.environ.get("RANK", "0")) != 0:
        raise ConfigError("multi-process trainers need --config (CADENCE_CONFIG) on every rank")
    log.info("no --config: waiting for a run submitted with `cadence run CONFIG --attach`")
    config = runs.claim_next(streams.connect(settings.redis_url))
    assert config is not None  # blocks until a submission arrives
    run_dir = run_folder(settings.run_dir, config.run_id)
    log.info("claimed run %s", config.run_id, extra={"run_dir": str(run_dir)})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_run_config(config))  # the report reads it
    return config, config.run_id, settings.model_copy(update={"run_dir": run_dir})


def serve(settings: TrainerSettings) -> None:
    """Run the trainer for the configured run; rank 0 also feeds prompts and serves gRPC. A finished run's
    trainer idles without loading the model (nor DeepSpeed, nor the prompts)."""
    setup_logging("trainer", settings.log_level, settings.log_format)
    config, run_id, settings = _load(settings)
    from cadence.trainer.resume import agreed_view

    point = agreed_view(settings.run_dir)
    if point.finished:
        if int(os.environ.get("RANK", "0")) == 0:
            _idle_main(settings, config, run_id, point.finished)
        else:
            _wait_for_signal()
        return
    from transformers import AutoTokenizer

    from cadence.models import resolve_model
    from cadence.trainer.engine import TrainEngine
    from cadence.trainer.update import follow

    model_dir = resolve_model(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = TrainEngine(model_dir, config)
    if engine.is_main:
        _serve_main(settings, config, run_id, engine, tokenizer)
    else:
        signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: rank 0 leads the stop (checkpoint, then stop)"))
        follow(engine, tokenizer, settings.run_dir)
    engine.close()  # only after a clean finish: after a failure the peers may be inside another collective


def _wait_for_signal() -> None:
    """A finished run's ranks > 0: nothing to do until the pod is stopped."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _idle_main(settings: TrainerSettings, config: RunConfig, run_id: str, finished: dict[str, Any]) -> None:
    """A finished run's trainer restarted (a StatefulSet restarts a container that exited 0): report the run
    done over gRPC and in Redis until stopped, so the run's end stays its end."""
    from cadence import streams
    from cadence.trainer.loop import LoopState

    run = FinishedRun(config, run_id, LoopState(finished["step"], finished["version"], "done"))
    fields = {"state": "done", "step": run.status.step, "version": run.status.version}
    streams.write_meta(streams.connect(settings.redis_url), run_id, fields | {"total_steps": config.steps})
    server = _start_service(settings, run)
    log.info("run %s finished at step %d; idle until stopped", run_id, run.status.step)
    try:
        run.stopped.wait()
    finally:
        server.stop(settings.grace_seconds)


class FinishedRun:
    """What the Trainer service reports for a finished run: its last step and version, state `done`."""

    def __init__(self, config: RunConfig, run_id: str, status: Any) -> None:
        self.config, self.run_id, self.status = config, run_id, status
        self.stopped = threading.Event()

    def request_stop(self, reason: str) -> None:
        log.info("stop requested: %s", reason)
        self.stopped.set()


def _serve_main(settings: TrainerSettings, config: RunConfig, run_id: str, engine: Any, tokenizer: Any) -> None:
    from cadence import streams
    from cadence.chat import prompt_token_ids
    from cadence.clients.broker import BrokerClient
    from cadence.tasks import load_problems
    from cadence.trainer.feeder import Feeder, PromptPlan
    from cadence.trainer.loop import TrainLoop

    client = streams.connect(settings.redis_url)
    meta = {"config": dump_run_config(config), "state": "starting", "total_steps": config.steps}
    streams.write_meta(client, run_id, meta)
    problems = [load_problems(task, seed=config.seed) for task in config.tasks]
    plan = PromptPlan(config, problems, run_id, token_count=lambda p: len(prompt_token_ids(tokenizer, p.chat())))
    transport = BrokerClient(settings.broker_addr, run_id, keyframe_every=settings.keyframe_every)
    loop = TrainLoop(engine, tokenizer, client, Feeder(client, plan), transport, settings.run_dir, run_id)
    loop.publisher.broadcaster = _broadcaster(settings, transport)
    server = _start_service(settings, loop)
    try:
        loop.run()
    except BaseException:
        loop.status.state = "failed"
        streams.write_meta(client, run_id, {"state": "failed"})
        raise
    finally:
        server.stop(settings.grace_seconds)
        if loop.publisher.broadcaster is not None:
            loop.publisher.broadcaster.close()
        transport.close()


def _broadcaster(settings: TrainerSettings, transport: Any) -> Any:
    """The collective path's sender (`CADENCE_BROADCAST`), or None when off."""
    if not settings.broadcast:
        return None
    from cadence.net import reachable_host
    from cadence.trainer.broadcasting import Broadcaster

    host = reachable_host(settings.broadcast_addr)
    return Broadcaster(transport, host, backend=settings.broadcast_backend, timeout_s=settings.broadcast_timeout_s)


def _start_service(settings: TrainerSettings, target: Any) -> Any:
    """Serve the Trainer gRPC service and the metrics endpoint for `target` (the loop, or a finished run), and
    make SIGTERM/SIGINT ask it to stop. Returns the started server: the caller stops it."""
    from cadence.grpc import ServiceServer
    from cadence.metrics import serve_metrics
    from cadence.trainer.server import TrainerServicer
    from cadence.v1 import trainer_pb2_grpc

    server = ServiceServer("trainer", settings.host, settings.grpc_port or default_port("trainer"))
    server.add_servicer(trainer_pb2_grpc.add_TrainerServicer_to_server, TrainerServicer(target), "cadence.v1.Trainer")
    server.start()
    serve_metrics(settings.metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: target.request_stop("signal"))
    return server


# Last in the module: under torchrun (`-m cadence.trainer.main`) this module is __main__, so anything defined
# below this block would not exist yet when serve() runs (a helper placed below it failed on rank 0).
if __name__ == "__main__":  # the per-rank entry point of torchrun / the deepspeed launcher
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_on_error(lambda: serve(from_argv(TrainerSettings, sys.argv[1:], prog="cadence.trainer.main")))
