"""gRPC front of the reward service: `cadence.v1.Reward/Score` and `Status` over the shared `Scorer`.

Thin: decode, call the core, encode. Errors are raised as `cadence.errors` and mapped to status codes by
`cadence.grpc`'s interceptor; API keys are checked by `AuthInterceptor` (health and reflection stay open).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from cadence.errors import CadenceError
from cadence.grpc import status_code
from cadence.reward import metrics
from cadence.reward.auth import ApiKeys
from cadence.reward.scoring import Item, Scorer
from cadence.v1 import reward_pb2, reward_pb2_grpc

SERVICE = "cadence.v1.Reward"


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <key>` metadata on the Reward service when keys are configured."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if not self.keys.enabled or not details.method.startswith(f"/{SERVICE}/"):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        try:
            self.keys.check_header(metadata.get("authorization"))
        except CadenceError as error:
            code, message = status_code(error), str(error)

            def deny(_request: Any, context: grpc.ServicerContext) -> None:
                context.abort(code, message)

            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(details)


class RewardServicer(reward_pb2_grpc.RewardServicer):
    """`Score` and `Status` over one `Scorer`."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreReply:
        started, code = time.perf_counter(), "OK"
        try:
            results = self.scorer.score([Item.from_pb(pb) for pb in request.items])
        except CadenceError as error:
            code = error.grpc_code
            raise
        finally:
            metrics.REQUESTS.labels("grpc", "Score", code).inc()
            metrics.LATENCY.labels("grpc", "Score").observe(time.perf_counter() - started)
        metrics.observe_items(results)
        return reward_pb2.ScoreReply(results=[result.to_pb() for result in results])

    def Status(self, request: reward_pb2.RewardStatusRequest, context: grpc.ServicerContext) -> reward_pb2.RewardStatus:
        verifier, rm = self.scorer.verifier, self.scorer.reward_model
        return reward_pb2.RewardStatus(
            tasks=self.scorer.tasks,
            reward_model=rm.name if rm is not None else "",
            pool_processes=verifier.processes if verifier is not None else 0,
            pool_restarts=verifier.restarts if verifier is not None else 0,
            ready=self.scorer.ready,
        )
