"""A replica's side of the collective path: take a version by the trainer's broadcast, else from the broker.

The replica joins the broker's broadcast group once (`JoinGroup`, `cadence.broker.groups`). For each version
it is about to load it asks the broker which group carries it: a member joins that epoch's collective if it is
new (vLLM's `init_weight_transfer_engine`, `VllmEngine.join_broadcast`), receives the payload, checks it against
the broker's manifest for the version and loads it (`VllmEngine.load_broadcast`). A non-member, or a member
whose broadcast timed out or arrived damaged (`BroadcastFailed`: the model untouched), fetches the version from
the broker as before; a failure is reported, so the group re-forms at a later epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cadence.errors import BroadcastFailed, CadenceError
from cadence.logging import get_logger
from cadence.v1 import broker_pb2

if TYPE_CHECKING:
    from cadence.clients.broker import BrokerClient

log = get_logger(__name__)


class BroadcastMember:
    """Loads versions into `engine` (a `VllmEngine`) by broadcast when the broker's group carries them."""

    def __init__(self, broker: BrokerClient, engine: Any, replica: str, *, timeout_s: float = 30.0) -> None:
        self.broker, self.engine, self.replica, self.timeout_s = broker, engine, replica, timeout_s
        self.epoch = 0  # the epoch whose collective the engine has joined
        self.received = 0  # versions loaded by broadcast (for tests and logs)

    def join(self) -> None:
        """Ask to be in the next epoch (the trainer's next `FormGroup` takes this replica in; every `take` asks
        again, so a broker that is down now only delays it)."""
        try:
            self._ask(-1)
        except CadenceError as error:
            log.warning("could not join the broadcast group yet: %s", error)

    def take(self, version: int) -> bool:
        """Load `version` by broadcast if the group that carries it has this replica; False: fetch it instead."""
        try:
            group = self._ask(version)
        except CadenceError as error:  # the broker is down or refuses: the fetch path has its own retries
            log.warning("broadcast group unknown for version %d (%s); fetching it", version, error)
            return False
        if group.rank <= 0:
            return False
        try:
            if group.epoch != self.epoch:
                from cadence.inference.weight_transfer import BroadcastGroup

                self.epoch = 0
                self.engine.join_broadcast(BroadcastGroup.from_pb(group).init_info(self.replica, self.timeout_s))
                self.epoch = group.epoch
            self.engine.load_broadcast(group.manifest, version)
        except BroadcastFailed as error:
            log.warning("broadcast of version %d failed (%s); fetching it from the broker", version, error)
            self._fell_back(group)
            return False
        self.received += 1
        return True

    def leave(self) -> None:
        """Leave the group (shutting down), so the trainer's next epoch does not wait for this replica."""
        try:
            self._ask(-1, leave=True)
        except CadenceError as error:
            log.warning("could not leave the broadcast group: %s", error)

    def _fell_back(self, group: broker_pb2.BroadcastGroup) -> None:
        """Drop the epoch's collective and tell the broker, which re-forms the group at a later epoch."""
        self.epoch = 0
        try:
            self.engine.leave_broadcast()
            self._ask(group.version, failed_epoch=group.epoch)
        except CadenceError as error:
            log.warning("reporting the failed broadcast failed: %s", error)

    def _ask(self, version: int, *, failed_epoch: int | None = None, leave: bool = False) -> broker_pb2.BroadcastGroup:
        request = broker_pb2.JoinGroupRequest(
            run_id=self.broker.run_id, replica=self.replica, version=version, failed_epoch=failed_epoch, leave=leave
        )
        return self.broker.unary("JoinGroup", request)
