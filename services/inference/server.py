"""The `cadence.v1.Inference` servicer: decode the request, call the engine, encode the reply.

Errors are raised as `cadence.errors` types; the interceptor of `cadence.grpc.ServiceServer` maps them to
status codes. `Generate` calls share the engine with the rollout worker (vLLM batches them together).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from cadence.errors import InvalidRequest, TooLarge
from cadence.inference.engine import MAX_PROMPTS, Engine, SamplingParams, prompt_input
from cadence.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """`Generate` for evaluation and ad-hoc use; `Status` for people and probes."""

    def __init__(
        self,
        engine: Engine,
        model: str,
        *,
        worker_id: str = "",
        pending: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.worker_id = worker_id
        self.pending = pending

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateReply:
        if not request.prompts:
            raise InvalidRequest("GenerateRequest.prompts is empty; send at least one prompt")
        if len(request.prompts) > MAX_PROMPTS:
            raise TooLarge(f"{len(request.prompts)} prompts in one request; send at most {MAX_PROMPTS}")
        for index, prompt in enumerate(request.prompts):
            if not prompt.text and not prompt.messages:
                raise InvalidRequest(f"prompts[{index}] has neither text nor messages")
        params = SamplingParams.from_pb(request.sampling)
        generation = self.engine.generate([prompt_input(p) for p in request.prompts], params)
        return inference_pb2.GenerateReply(
            completions=[
                inference_pb2.Completions(
                    samples=[sample.to_pb() for sample in completion.samples],
                    prompt_token_ids=completion.prompt_token_ids,
                )
                for completion in generation.completions
            ],
            policy_version=generation.policy_version,
        )

    def Status(
        self, request: inference_pb2.InferenceStatusRequest, context: grpc.ServicerContext
    ) -> inference_pb2.InferenceStatus:
        return inference_pb2.InferenceStatus(
            engine=self.engine.kind,
            model=self.model,
            loaded_version=self.engine.version,
            pending_prompts=self.pending() if self.pending is not None else 0,
            worker_id=self.worker_id,
        )
