"""The gRPC bootstrap: health, reflection, typed errors mapped to status codes, message sizes, drain."""

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cadence import errors
from cadence.grpc import MAX_MESSAGE_BYTES, ServiceServer, channel, wait_healthy
from cadence.v1 import trainer_pb2, trainer_pb2_grpc


class ProbeTrainer(trainer_pb2_grpc.TrainerServicer):
    """A servicer whose behaviour each test chooses through the request, to exercise the bootstrap."""

    def Status(self, request: trainer_pb2.TrainerStatusRequest, context: grpc.ServicerContext):
        return trainer_pb2.TrainerStatus(run_id="probe", state="x" * (6 * 1024 * 1024))

    def Stop(self, request: trainer_pb2.StopRequest, context: grpc.ServicerContext):
        outcomes = {
            "invalid": errors.InvalidRequest("field x is bad; send y"),
            "busy": errors.Overloaded("too busy"),
            "missing": errors.VersionNotFound("version 3 evicted; available: [4, 5]"),
            "bug": ZeroDivisionError("boom"),
        }
        if request.reason in outcomes:
            raise outcomes[request.reason]
        return trainer_pb2.StopReply(step=7)


@pytest.fixture
def server() -> Iterator[ServiceServer]:
    srv = ServiceServer("probe", "127.0.0.1", 0)
    srv.add_servicer(trainer_pb2_grpc.add_TrainerServicer_to_server, ProbeTrainer(), "cadence.v1.Trainer")
    srv.start()
    yield srv
    srv.stop(0)


@pytest.mark.parametrize(
    ("reason", "code", "detail"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "send y"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy"),
        ("missing", grpc.StatusCode.NOT_FOUND, "available: [4, 5]"),
        ("bug", grpc.StatusCode.INTERNAL, "internal error (ZeroDivisionError); see the service log"),
    ],
)
def test_errors_map_to_status_codes(server: ServiceServer, reason: str, code: grpc.StatusCode, detail: str) -> None:
    with channel(f"127.0.0.1:{server.port}") as chan:
        stub = trainer_pb2_grpc.TrainerStub(chan)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Stop(trainer_pb2.StopRequest(reason=reason), timeout=5)
        assert caught.value.code() == code
        assert detail in caught.value.details()
        assert stub.Stop(trainer_pb2.StopRequest(reason="ok"), timeout=5).step == 7  # still serving


def test_large_messages_pass(server: ServiceServer) -> None:
    with channel(f"127.0.0.1:{server.port}") as chan:
        reply = trainer_pb2_grpc.TrainerStub(chan).Status(trainer_pb2.TrainerStatusRequest(), timeout=10)
    assert len(reply.state) == 6 * 1024 * 1024 < MAX_MESSAGE_BYTES


def test_health_and_reflection(server: ServiceServer) -> None:
    target = f"127.0.0.1:{server.port}"
    wait_healthy(target, timeout=5)
    with grpc.insecure_channel(target) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        reply = health.Check(health_pb2.HealthCheckRequest(service="cadence.v1.Trainer"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"cadence.v1.Trainer", "grpc.health.v1.Health"} <= names
    server.set_serving(False)
    with grpc.insecure_channel(target) as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_busy_port_is_a_clear_error(server: ServiceServer) -> None:
    other = ServiceServer("clash", "127.0.0.1", server.port)
    with pytest.raises(errors.NotReady, match="--grpc-port"):
        other.start()
