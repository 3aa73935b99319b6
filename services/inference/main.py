"""`cadence serve inference`: the engine, the rollout worker and the `cadence.v1.Inference` gRPC server.

Loads the model (`--model`: a directory, a hub id or a seed name) into the engine (`auto`: vLLM when it is
importable, else transformers), then serves `Generate`/`Status` with health and reflection, and — unless
`--no-worker` — consumes the run's prompt stream, syncing weights from the broker per the cadence rule.
SIGTERM: NOT_SERVING, the worker finishes the batch in hand, in-flight calls drain, the engine shuts down.
torch and vLLM are imported only inside `serve`, so `--help` stays instant.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cadence.inference.settings import InferenceSettings
from cadence.logging import get_logger
from cadence.settings import default_port

if TYPE_CHECKING:
    from cadence.clients.relay import Relay
    from cadence.grpc import ServiceServer
    from cadence.inference.engine import Engine
    from cadence.inference.worker import RolloutWorker


def serve(settings: InferenceSettings) -> None:
    """Run the inference service until SIGTERM/SIGINT; exit non-zero if the worker crashes."""
    from cadence.grpc import ServiceServer
    from cadence.inference.factory import create_engine, resolve_engine_kind
    from cadence.inference.server import InferenceServicer
    from cadence.inference.worker import default_worker_id
    from cadence.logging import setup_logging
    from cadence.metrics import serve_metrics
    from cadence.models import resolve_model
    from cadence.v1 import inference_pb2_grpc

    kind = resolve_engine_kind(settings.engine)
    setup_logging("inference", settings.log_level, settings.log_format)
    log = get_logger(__name__)
    model_dir = resolve_model(settings.model)
    log.info("loading model", extra={"engine": kind, "model": str(model_dir)})
    options = {"tensor_parallel_size": settings.tensor_parallel_size} if kind == "vllm" else {}
    engine = create_engine(kind, model_dir, **options)
    worker_id = settings.worker_id or default_worker_id()
    server = ServiceServer("inference", settings.host, settings.grpc_port or default_port("inference"))
    runner: _WorkerThread | None = None
    relay: Relay | None = None
    try:
        worker: RolloutWorker | _RunFollower | None = None
        if settings.worker:
            relay = _start_relay(settings)
            worker = (
                _build_worker(settings, engine, worker_id, settings.run_id, relay)
                if settings.run_id
                else _RunFollower(settings, engine, worker_id, model_dir, relay)
            )
        servicer = InferenceServicer(
            engine, settings.model, worker_id=worker_id, pending=worker.pending_prompts if worker else None
        )
        server.add_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, "cadence.v1.Inference")
        serve_metrics(settings.metrics_port, settings.host)
        port = server.start()
        log.info("inference ready", extra={"port": port, "engine": kind, "worker": worker_id if worker else None})
        runner = _WorkerThread(worker, server) if worker else None
        server.wait_for_termination(
            on_term=(lambda: runner.stop(settings.grace_seconds)) if runner else None, grace=settings.grace_seconds
        )
    finally:
        if relay is not None and relay.server is not None:
            relay.server.stop(0)
        engine.close()
    if runner is not None and runner.crashed:
        raise SystemExit(1)


def _start_relay(settings: InferenceSettings) -> Relay | None:
    """The relay fan-out server (`CADENCE_RELAY_PORT`), shared by the runs this process serves; None when off."""
    if not settings.relay_port:
        return None
    from cadence.clients.relay import start_relay

    return start_relay(settings.host, settings.relay_port, settings.relay_addr)


def _build_worker(
    settings: InferenceSettings, engine: Engine, worker_id: str, run_id: str, relay: Relay | None
) -> RolloutWorker:
    from cadence.clients.broker import BrokerClient
    from cadence.errors import ConfigError
    from cadence.inference.broadcast import BroadcastMember
    from cadence.inference.worker import RolloutWorker
    from cadence.streams import connect

    weights = BrokerClient(settings.broker_addr, run_id, apply_deltas=True, relay=relay)  # the engine copies loads
    broadcast = None
    if settings.broadcast:
        if not hasattr(engine, "load_broadcast"):
            raise ConfigError(f"CADENCE_BROADCAST needs the vllm engine (this replica runs {engine.kind!r})")
        broadcast = BroadcastMember(weights, engine, worker_id, timeout_s=settings.broadcast_timeout_s)
    return RolloutWorker(
        engine,
        connect(settings.redis_url),
        run_id,
        weights,
        worker_id=worker_id,
        batch_prompts=settings.batch_prompts,
        reclaim_idle_ms=settings.reclaim_idle_ms,
        broadcast=broadcast,
    )


class _RunFollower:
    """Without CADENCE_RUN_ID: serve whichever run is active (`cadence run --attach`), from its seed weights."""

    def __init__(
        self, settings: InferenceSettings, engine: Engine, worker_id: str, model_dir: Any, relay: Relay | None
    ) -> None:
        self.settings, self.engine, self.worker_id, self.model_dir = settings, engine, worker_id, model_dir
        self.relay = relay
        self.current: RolloutWorker | None = None

    def pending_prompts(self) -> int:
        return self.current.pending_prompts() if self.current else 0

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    def run(self, stop: threading.Event) -> None:
        from cadence.runs import follow_active_runs
        from cadence.streams import connect

        get_logger(__name__).info("no CADENCE_RUN_ID: following the active run (`cadence run --attach`)")
        follow_active_runs(connect(self.settings.redis_url), self._serve_run, stop)

    def _serve_run(self, run_id: str, run_stop: threading.Event) -> None:
        if self.engine.version != 0:  # a new run starts from the seed, version 0
            self.engine.load_weights(_seed_tensors(self.model_dir), version=0)
        self.current = _build_worker(self.settings, self.engine, self.worker_id, run_id, self.relay)
        try:
            self.current.run(run_stop)
        finally:
            self.current.close()


def _seed_tensors(model_dir: Any) -> Iterator[tuple[str, Any]]:
    """The seed model's tensors, read from its safetensors files."""
    from pathlib import Path

    from safetensors.torch import load_file

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        yield from load_file(path).items()


class _WorkerThread:
    """Runs the worker beside the server; a crash stops the server so the process exits (and is restarted)."""

    def __init__(self, worker: RolloutWorker | _RunFollower, server: ServiceServer) -> None:
        self.worker, self.server = worker, server
        self.crashed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self._stop)
        except Exception:
            get_logger(__name__).exception("rollout worker crashed; stopping the service")
            self.crashed = True
            self.server.stop(0)

    def stop(self, grace: float) -> None:
        """Let the worker finish the batch in hand (up to `grace` seconds)."""
        self._stop.set()
        self._thread.join(grace)
        self.worker.close()
