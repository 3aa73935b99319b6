"""gRPC bootstrap shared by every service: server with health, reflection, error mapping and drain; channels.

Servicers stay thin: they decode, call the core, encode, and simply raise `cadence.errors` types. One
interceptor maps those to status codes (and anything unexpected to INTERNAL with a pointer to the log).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cadence.errors import CadenceError, NotReady
from cadence.logging import get_logger

log = get_logger(__name__)

# A 4 MiB weight chunk plus framing exceeds gRPC's 4 MiB default, so every side sets sizes explicitly.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CADENCE_SERVICES = ("cadence.v1.Inference", "cadence.v1.Reward", "cadence.v1.Broker", "cadence.v1.Trainer")

_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": name} for name in CADENCE_SERVICES],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def message_size_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def channel_options() -> list[tuple[str, Any]]:
    """Sizes, retries on UNAVAILABLE, and keepalives that notice a dead peer within ~30 s."""
    return [
        *message_size_options(),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _RETRY_CONFIG),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def channel(target: str) -> grpc.Channel:
    """An insecure channel to `host:port` with Cadence's sizes, retries and keepalives."""
    return grpc.insecure_channel(target, options=channel_options())


def aio_channel(target: str) -> grpc.aio.Channel:
    """The asyncio twin of `channel`."""
    return grpc.aio.insecure_channel(target, options=channel_options())


def status_code(error: CadenceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)


def _abort_for(error: Exception, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(error, CadenceError):
        context.abort(status_code(error), str(error))
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the service log")


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps `cadence.errors` raised by servicers to status codes; unexpected errors to INTERNAL."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for attr, factory in kinds.items():
            behaviour = getattr(handler, attr)
            if behaviour is not None:
                wrapped = _wrap_stream(behaviour, method) if attr.endswith("stream") else _wrap(behaviour, method)
                return factory(
                    wrapped,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def _wrap(behaviour: Callable, method: str) -> Callable:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as error:
            if _already_aborted(context):
                raise
            _abort_for(error, context, method)

    return call


def _wrap_stream(behaviour: Callable, method: str) -> Callable:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(request, context)
        except Exception as error:
            if _already_aborted(context):
                raise
            _abort_for(error, context, method)

    return call


class ServiceServer:
    """A gRPC server with the standard health service, reflection, error mapping and graceful drain."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        max_workers: int = 16,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-grpc"),
            interceptors=[*interceptors, ErrorInterceptor()],
            options=[*message_size_options(), ("grpc.so_reuseport", 0)],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.port = 0
        self._stopped = threading.Event()

    def add_servicer(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any, service_name: str) -> None:
        """Register e.g. `(broker_pb2_grpc.add_BrokerServicer_to_server, servicer, "cadence.v1.Broker")`."""
        add_fn(servicer, self.server)
        self.service_names.append(service_name)

    def start(self) -> int:
        """Bind, start, mark every service SERVING; return the bound port."""
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise NotReady(f"{self.name}: cannot bind {self.address}; is the port in use? pass another --grpc-port")
        self.server.start()
        self.set_serving(True)
        log.info("%s gRPC listening", self.name, extra={"address": self.address, "port": self.port})
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float = 5.0) -> None:
        """Mark NOT_SERVING, refuse new calls, give in-flight calls `grace` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()
        self._stopped.set()

    def wait_for_termination(self, on_term: Callable[[], None] | None = None, grace: float = 10.0) -> None:
        """Block until SIGTERM/SIGINT (or `stop()`): then NOT_SERVING, `on_term()`, drain, return."""
        requested = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: requested.set())
        while not requested.is_set() and not self._stopped.is_set():
            requested.wait(0.5)
        if self._stopped.is_set():
            return
        log.info("%s draining", self.name)
        self.set_serving(False)
        if on_term is not None:
            on_term()
        self.stop(grace)


def wait_healthy(target: str, timeout: float = 30.0, service: str = "") -> None:
    """Poll `grpc.health.v1` at `target` until SERVING; raise `NotReady` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(target) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            time.sleep(0.2)
    raise NotReady(f"{target} not healthy after {timeout:.0f}s (last: {last}); check that service's log")
