"""`cadence serve reward`: HTTP (uvicorn), gRPC and, optionally, the queue worker in one process.

All three fronts share one `Scorer` (one verifier pool, one reward model). SIGTERM marks gRPC health and
`/readyz` as not serving, stops the worker after its batch in hand, lets in-flight requests finish within
`grace_seconds`, then stops the pool. torch is imported only when a reward model is configured.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from cadence.errors import NotReady
from cadence.grpc import ServiceServer
from cadence.logging import get_logger, setup_logging
from cadence.reward import metrics
from cadence.reward.auth import ApiKeys
from cadence.reward.grpc_server import SERVICE, AuthInterceptor, RewardServicer
from cadence.reward.http import create_app
from cadence.reward.scoring import Limits, Scorer
from cadence.reward.settings import RewardSettings
from cadence.reward.verifier import MathVerifier
from cadence.reward.worker import RewardWorker
from cadence.settings import default_port
from cadence.v1 import reward_pb2_grpc

log = get_logger(__name__)


def build_scorer(settings: RewardSettings) -> Scorer:
    """The verifier pool and, when configured, the reward model, behind one `Scorer`."""
    verifier = MathVerifier(settings.pool_processes, settings.item_timeout_seconds, settings.strict_format)
    reward_model = None
    if settings.reward_model:
        from cadence.reward.reward_model import RewardModel

        reward_model = RewardModel(
            settings.reward_model,
            device=settings.rm_device,
            max_batch_tokens=settings.rm_max_batch_tokens,
            kind=settings.rm_kind,
        )
    limits = Limits(
        max_items=settings.max_items,
        max_prompt_chars=settings.max_response_chars,
        max_response_chars=settings.max_response_chars,
        max_reference_chars=settings.max_reference_chars,
        max_inflight_items=settings.max_inflight_items,
    )
    if not verifier.wait_ready():
        raise NotReady("math-verify worker processes did not start within 60s; see the log above")
    return Scorer(verifier, reward_model, limits)


class RewardService:
    """The running service: `start()` binds both ports (and starts the worker), `stop()` drains."""

    def __init__(self, settings: RewardSettings, scorer: Scorer | None = None) -> None:
        self.settings = settings
        keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
        self.scorer = scorer or build_scorer(settings)
        verifier = self.scorer.verifier
        metrics.track(lambda: verifier.restarts if verifier else 0, lambda: self.scorer.admission.in_flight)
        self.app = create_app(
            self.scorer, keys, max_body_bytes=settings.max_body_bytes, max_requests=settings.max_inflight_requests
        )
        port = settings.grpc_port or default_port("reward")
        self.grpc = ServiceServer("reward", settings.host, port, interceptors=[AuthInterceptor(keys)])
        self.grpc.add_servicer(reward_pb2_grpc.add_RewardServicer_to_server, RewardServicer(self.scorer), SERVICE)
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.http_port,
            log_config=None,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=int(settings.grace_seconds),
        )
        self.http = uvicorn.Server(config)
        self._threads: list[threading.Thread] = []
        self._stop_worker = threading.Event()

    def start(self) -> None:
        self.grpc.start()
        http = threading.Thread(target=self.http.run, name="reward-http", daemon=True)
        http.start()
        self._threads.append(http)
        deadline = time.monotonic() + 30
        while not self.http.started:
            if not http.is_alive() or time.monotonic() > deadline:
                raise NotReady(f"HTTP server did not start on port {self.settings.http_port}; is it in use?")
            time.sleep(0.02)
        log.info("reward HTTP listening", extra={"port": self.settings.http_port})
        if self.settings.worker:
            self._start_worker()

    def _start_worker(self) -> None:
        """Consume the configured run's rollouts, or (no run id) whichever run the fleet serves now."""
        if self.settings.run_id:
            target, args = self._serve_run, (self.settings.run_id, self._stop_worker)
        else:
            log.info("no CADENCE_RUN_ID: the queue worker follows the active run (`cadence run --attach`)")
            target, args = self._follow_runs, ()
        thread = threading.Thread(target=target, args=args, name="reward-worker", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_run(self, run_id: str, stop: threading.Event) -> None:
        worker = RewardWorker(
            self.scorer,
            self.settings.redis_url,
            run_id,
            batch=self.settings.worker_batch,
            reclaim_idle_ms=self.settings.reclaim_idle_ms,
        )
        worker.run(stop)

    def _follow_runs(self) -> None:
        from cadence.runs import follow_active_runs
        from cadence.streams import connect

        follow_active_runs(connect(self.settings.redis_url), self._serve_run, self._stop_worker)

    def drain(self) -> None:
        """Stop taking work: not ready, worker stops after its batch, HTTP finishes in-flight requests."""
        self.app.state.draining = True
        self._stop_worker.set()
        self.http.should_exit = True
        for thread in self._threads:
            thread.join(self.settings.grace_seconds)

    def stop(self) -> None:
        self.drain()
        self.grpc.stop(self.settings.grace_seconds)
        self.close()

    def close(self) -> None:
        if self.scorer.verifier is not None:
            self.scorer.verifier.close()


def serve(settings: RewardSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit."""
    setup_logging("reward")
    service = RewardService(settings)
    service.start()
    service.grpc.wait_for_termination(on_term=service.drain, grace=settings.grace_seconds)
    service.close()
    log.info("reward service stopped")
