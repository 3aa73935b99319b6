"""`cadence.v1.Inference` over real gRPC on loopback with the HF engine on the random-init tiny model:
Generate, Status, health, reflection, precise errors; and the service's start-up refusal without a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cadence.errors import ConfigError
from cadence.grpc import ServiceServer, channel
from cadence.inference.engine import SamplingParams
from cadence.inference.hf_engine import HFEngine
from cadence.inference.main import serve
from cadence.inference.server import InferenceServicer
from cadence.inference.settings import InferenceSettings
from cadence.net import free_port
from cadence.v1 import common_pb2, inference_pb2, inference_pb2_grpc

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(untrained_tiny_model_dir: Path) -> HFEngine:
    return HFEngine(untrained_tiny_model_dir)


@pytest.fixture(scope="module")
def target(engine: HFEngine) -> Iterator[str]:
    server = ServiceServer("inference", "127.0.0.1", free_port())
    servicer = InferenceServicer(engine, "tiny", worker_id="w-test", pending=lambda: 7)
    server.add_servicer(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, "cadence.v1.Inference")
    port = server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0.5)


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[inference_pb2_grpc.InferenceStub]:
    with channel(target) as chan:
        yield inference_pb2_grpc.InferenceStub(chan)


def test_generate_returns_n_samples_per_prompt_matching_the_engine(
    stub: inference_pb2_grpc.InferenceStub, engine: HFEngine
) -> None:
    messages = [common_pb2.ChatMessage(role="user", content="What is 2+2?")]
    request = inference_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text="What is 1+1?"), common_pb2.Prompt(messages=messages)],
        sampling=common_pb2.SamplingParams(n=3, temperature=0.0, max_tokens=6),
    )
    reply = stub.Generate(request, timeout=30)
    assert reply.policy_version == 0 and len(reply.completions) == 2
    expected = engine.generate(["What is 1+1?"], SamplingParams(temperature=0.0, max_tokens=6)).completions[0]
    first = reply.completions[0]
    assert list(first.prompt_token_ids) == expected.prompt_token_ids
    assert len(first.samples) == 3
    assert all(list(s.token_ids) == expected.samples[0].token_ids for s in first.samples)
    assert all(len(s.logprobs) == len(s.token_ids) for c in reply.completions for s in c.samples)


def test_status_reports_engine_model_version_and_pending(stub: inference_pb2_grpc.InferenceStub) -> None:
    status = stub.Status(inference_pb2.InferenceStatusRequest(), timeout=5)
    assert (status.engine, status.model, status.loaded_version) == ("hf", "tiny", 0)
    assert (status.pending_prompts, status.worker_id) == (7, "w-test")


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (inference_pb2.GenerateRequest(), "empty"),
        (inference_pb2.GenerateRequest(prompts=[common_pb2.Prompt()]), "neither text nor messages"),
        (
            inference_pb2.GenerateRequest(
                prompts=[common_pb2.Prompt(text="hi")], sampling=common_pb2.SamplingParams(n=100)
            ),
            "sampling.n",
        ),
        (
            inference_pb2.GenerateRequest(
                prompts=[common_pb2.Prompt(text="1+" * 40)], sampling=common_pb2.SamplingParams(max_tokens=8)
            ),
            "context",
        ),
    ],
)
def test_bad_requests_get_invalid_argument_with_the_fix(
    stub: inference_pb2_grpc.InferenceStub, request_: inference_pb2.GenerateRequest, fragment: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_health_is_serving(target: str) -> None:
    with grpc.insecure_channel(target) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        for service in ("", "cadence.v1.Inference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_serve_refuses_an_unknown_engine() -> None:
    with pytest.raises(ConfigError, match="vllm, hf"):
        serve(InferenceSettings(run_id="", worker=False, engine="onnx"))
