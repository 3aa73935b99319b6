"""Broadcast groups: which replicas take version v by a collective broadcast from the trainer (rank 0).

The broker is the source of truth for the collective path (`cadence.trainer.broadcasting`, the "cadence"
weight-transfer backend in vLLM): replicas *join* (`JoinGroup`), and the trainer, before it publishes a version,
asks for the group that will take it (`FormGroup`). The group is formed once and kept for version after version
(an NCCL group costs seconds to set up); a new *epoch* starts when the replicas that joined differ from its
members or when the current epoch failed. Members are ranks 1.. in the order they joined; the trainer announces
where it opens the epoch's rendezvous (`master_addr`), and the group that carries each version is remembered, so
a replica that asks about version v learns its rank in *that* group, or -1: fetch v from the broker.

A broadcast that fails or times out (bounded, on both sides) ends the epoch: the trainer reports it with its next
`FormGroup`, which drops the epoch's members until they rejoin (a dead one never does), and a member that fell
back reports it with its `JoinGroup`, so the group re-forms at a later epoch. Late joiners fetch the current
version and enter the next epoch. Pure logic: no gRPC.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from cadence.broker.relay import ADDRESS
from cadence.errors import InvalidRequest

BACKENDS = ("gloo", "nccl")
MAX_MEMBERS = 1024
KEPT_VERSIONS = 64  # versions whose group is remembered, per run


@dataclass(frozen=True)
class Group:
    """One epoch of a run's broadcast group (epoch 0, no members: there is none)."""

    epoch: int = 0
    members: tuple[str, ...] = ()
    master_addr: str = ""
    backend: str = ""

    def rank(self, replica: str) -> int:
        """`replica`'s rank (the trainer is 0), or -1 when it is not a member."""
        return 1 + self.members.index(replica) if replica in self.members else -1


NO_GROUP = Group()


@dataclass
class _Run:
    joined: dict[str, None] = field(default_factory=dict)  # in join order
    current: Group = NO_GROUP
    failed: bool = False
    survivors: set[str] = field(default_factory=set)  # members that reported the current epoch failed (alive)
    epochs: int = 0
    carries: OrderedDict[int, Group] = field(default_factory=OrderedDict)


class GroupTable:
    """Joined replicas, the current epoch and the group that carries each version, per run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}

    def join(
        self, run_id: str, replica: str, version: int, failed_epoch: int | None = None, leave: bool = False
    ) -> tuple[Group, int]:
        """Register `replica` (or let it leave); the group that carries `version` and its rank there (-1: fetch)."""
        check_replica(replica)
        with self._lock:
            run = self._runs.setdefault(run_id, _Run())
            if failed_epoch is not None and failed_epoch == run.current.epoch:
                run.failed = True
                run.survivors.add(replica)
            if leave:
                run.joined.pop(replica, None)
                return NO_GROUP, -1
            if replica not in run.joined and len(run.joined) >= MAX_MEMBERS:
                raise InvalidRequest(f"run {run_id!r} already has {MAX_MEMBERS} replicas in its broadcast group")
            run.joined.setdefault(replica, None)
            group = run.carries.get(version, NO_GROUP)
            if failed_epoch is not None and failed_epoch == group.epoch:
                return group, -1  # it fell back: it fetches this version
            return group, group.rank(replica)

    def form(self, run_id: str, version: int, master_addr: str, backend: str, failed_epoch: int | None = None) -> Group:
        """The group that takes `version`: the current epoch, or a new one when membership changed or it failed."""
        if backend not in BACKENDS:
            raise InvalidRequest(f"broadcast backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if not ADDRESS.match(master_addr):
            raise InvalidRequest(
                f"broadcast master address {master_addr[:80]!r} is not host:port; set CADENCE_BROADCAST_ADDR to the "
                "trainer's address that replicas reach"
            )
        with self._lock:
            run = self._runs.setdefault(run_id, _Run())
            if failed_epoch is not None and failed_epoch == run.current.epoch:
                for member in set(run.current.members) - run.survivors:  # a dead one never rejoins
                    run.joined.pop(member, None)
                run.failed = True
            wanted = tuple(run.joined)
            if run.failed or wanted != run.current.members or (wanted and backend != run.current.backend):
                run.epochs += 1
                run.current = Group(run.epochs, wanted, master_addr, backend) if wanted else NO_GROUP
                run.failed, run.survivors = False, set()
            run.carries[version] = run.current
            while len(run.carries) > KEPT_VERSIONS:
                run.carries.popitem(last=False)
            return run.current

    def count(self) -> int:
        """Members of the current epochs, all runs."""
        with self._lock:
            return sum(len(run.current.members) for run in self._runs.values())


def check_replica(replica: str) -> str:
    if 0 < len(replica) <= 128 and replica.isprintable():
        return replica
    raise InvalidRequest(
        f"replica id {replica[:80]!r} must be 1-128 printable characters; set CADENCE_WORKER_ID to a unique name"
    )
