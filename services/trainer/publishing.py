"""The trainer's side of the broker: publish a version, never twice, and keep it there through broker faults.

- A version the broker already holds (a replay after a trainer restart) is not published again.
- An unreachable or full broker (`Overloaded`: its byte budget is held by fetches of evicted versions) is
  waited out (`BROKER_PATIENCE_SECONDS`), so a restarting or busy broker never kills a run.
- A broker that restarted empty gets the newest version again (`republish_if_lost`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cadence.errors import NotReady, Overloaded
from cadence.logging import get_logger
from cadence.retry import Backoff, Retry, retry
from cadence.weights import pack

if TYPE_CHECKING:
    from cadence.trainer.broadcasting import Broadcaster

log = get_logger(__name__)

BROKER_PATIENCE_SECONDS = 600.0
"""How long a publish waits out an unreachable broker before the trainer gives up."""
BROKER_BACKOFF = Backoff(1.0, cap=30.0)
T = TypeVar("T")


class Publisher:
    """Puts the trainer's weights on the broker through `transport` (a `BrokerClient`)."""

    def __init__(self, transport: Any, stop_requested: threading.Event) -> None:
        self.transport, self.stop_requested = transport, stop_requested
        self.published: int | None = None  # the newest version this process uploaded (not one it skipped)
        self.broadcaster: Broadcaster | None = None  # CADENCE_BROADCAST: also broadcast each version to the group

    def publish(self, state: dict, version: int) -> None:
        """Upload `version` unless the broker already holds it (a replay after a restart). Once this process
        has uploaded a version, every newer one is its own to upload: no need to ask (a round trip per sync)."""
        ours = self.published is not None and version > self.published
        latest = None if ours else self._latest_version()
        if latest is not None and latest >= version:
            log.warning("version %d already published (broker has %d); not publishing it again", version, latest)
        elif self.broadcaster is not None:
            self._publish_and_broadcast(state, version, self.broadcaster)
        else:
            self.patiently(lambda: self.transport.publish(state, version), f"publish version {version}")
            self.published = version

    def _publish_and_broadcast(self, state: dict, version: int, broadcaster: Broadcaster) -> None:
        """Form the group first (members that see the version find theirs), publish, then broadcast in the
        background (`cadence.trainer.broadcasting`)."""
        group = self.patiently(lambda: broadcaster.form(version), f"form the broadcast group of version {version}")
        packed = pack(state, run_id=self.transport.run_id, version=version)
        self.patiently(lambda: self.transport.publish_packed(packed), f"publish version {version}")
        self.published = version
        broadcaster.send(group, packed)

    def republish_if_lost(self, version: int, gather: Callable[[], dict]) -> None:
        """A broker restarted without a persistent store has lost our newest version, and workers that need it
        would wait forever: publish it again from `gather()`, which must return the weights of that version."""
        latest = self._latest_version()
        if latest is not None and latest >= version:
            return
        log.warning("the broker lost version %d (it has %s); publishing it again", version, latest)
        state = gather()
        self.patiently(lambda: self.transport.publish(state, version), f"publish version {version} again")

    def patiently(self, call: Callable[[], T], what: str) -> T:
        """A broker call that outlives a broker restart or a full broker: `NotReady` and `Overloaded` (after the
        client's own retries) are retried with backoff for up to `BROKER_PATIENCE_SECONDS`, unless a stop is
        requested meanwhile."""

        def warn(error: BaseException, delay: float) -> None:
            log.warning("broker unavailable (%s) during: %s; retrying in %.0fs", error, what, delay)

        loop = Retry(BROKER_BACKOFF, patience=BROKER_PATIENCE_SECONDS)
        return retry(call, loop, retry_on=(NotReady, Overloaded), on_retry=warn, give_up=self.stop_requested.is_set)

    def _latest_version(self) -> int | None:
        latest = self.patiently(self.transport.latest, "read the broker's latest version")
        return None if latest is None else latest.version
