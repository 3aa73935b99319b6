"""gRPC `cadence.v1.Trainer`: Status and Stop over the running loop (thin: decode, call, encode)."""

from __future__ import annotations

import grpc

from cadence.trainer.loop import TrainLoop
from cadence.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """Reports the loop's progress and asks it to stop after the current step."""

    def __init__(self, loop: TrainLoop) -> None:
        self.loop = loop

    def Status(
        self, request: trainer_pb2.TrainerStatusRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        status = self.loop.status
        metrics = {
            key: float(value)
            for key, value in status.metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        return trainer_pb2.TrainerStatus(
            run_id=self.loop.run_id,
            step=status.step,
            total_steps=self.loop.config.steps,
            version=status.version,
            state=status.state,
            metrics=metrics,
        )

    def Stop(self, request: trainer_pb2.StopRequest, context: grpc.ServicerContext) -> trainer_pb2.StopReply:
        self.loop.request_stop(request.reason or "Stop rpc")
        return trainer_pb2.StopReply(step=self.loop.status.step)
