"""Relay fan-out routes: which replica a fetcher takes a version from, so the broker sends about one copy.

Every fetcher asks the broker for a route first (`Route`). A fetcher that gives a relay address becomes a
*relay* of what it is about to receive (one version, in one form: the full payload or the delta against the
version before): it serves each chunk as soon as it has verified it, so a relay that is still fetching already
feeds others (a pipeline, not a store-and-forward). The broker answers with the relay that has the fewest
fetchers assigned among those that asked before this one, and with itself only when there is none: fetchers
that start together form a chain broker → A → B → C, later ones spread over the relays. A fetcher taking a
delta also relays the full version it rebuilds from it (to late joiners and restarted replicas), from the
moment it has rebuilt and verified it.

Routing only to earlier askers keeps the graph acyclic, so no two relays can wait on each other. A relay
reported as failed (dead, unreachable, or it sent a chunk that failed its digest) is dropped for the run; so
is a relay that moves on to another version (it no longer holds this one). Digests always come from the
broker, so a relay can waste a fetcher's time but never make it load wrong bytes.

Pure logic: no gRPC.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from cadence.errors import InvalidRequest

Key = tuple[str, int, bool]  # run id, version, delta form
BROKER = ""  # the upstream that is the broker itself
ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]{1,255}:[0-9]{1,5}$")
MAX_FAILED = 64


@dataclass
class Relay:
    """A replica relaying one version: where it serves, when it asked, and who it takes the version from."""

    address: str
    order: int
    upstream: str | None  # None: it rebuilds this version from a delta, fetched under another key


class RelayTable:
    """Relays per (run, version, form) and the route each was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._relays: dict[Key, dict[str, Relay]] = {}
        self._order = 0

    def route(self, key: Key, asker: str, failed: Iterable[str] = ()) -> str:
        """The upstream for `asker` (its relay address, or "" when it does not relay) fetching `key`."""
        failed = list(failed)
        check_address(asker, allow_empty=True)
        if len(failed) > MAX_FAILED:
            raise InvalidRequest(f"a route request names {len(failed)} failed relays; at most {MAX_FAILED}")
        with self._lock:
            for address in failed:
                self._drop(key[0], address)
            me = self._relays.get(key, {}).get(asker) if asker else None
            if asker and me is None:
                self._drop(key[0], asker, keep=key[1])  # it now relays this version only
            order = me.order if me is not None else self._next_order()
            relays = self._relays.setdefault(key, {})
            earlier = [relay for relay in relays.values() if relay.order < order and relay.address != asker]
            upstream = BROKER
            if earlier:
                load = {relay.address: 0 for relay in earlier}
                for relay in relays.values():
                    if relay.upstream in load and relay.address != asker:
                        load[relay.upstream] += 1
                upstream = min(earlier, key=lambda relay: (load[relay.address], relay.order)).address
            if asker:
                relays[asker] = Relay(asker, order, upstream)
            if asker and key[2]:  # a delta's fetcher will hold the full version too
                self._relays.setdefault((key[0], key[1], False), {}).setdefault(asker, Relay(asker, order, None))
            return upstream

    def prune(self, run_id: str, held: set[int]) -> None:
        """Forget relays of versions the store no longer holds."""
        with self._lock:
            for key in [key for key in self._relays if key[0] == run_id and key[1] not in held]:
                del self._relays[key]

    def count(self) -> int:
        """Relays registered, all runs and versions."""
        with self._lock:
            return sum(len(relays) for relays in self._relays.values())

    def _drop(self, run_id: str, address: str, keep: int | None = None) -> None:
        """Drop `address` from every version of the run (but `keep`)."""
        for key, relays in list(self._relays.items()):
            if key[0] == run_id and key[1] != keep:
                relays.pop(address, None)
                if not relays:
                    del self._relays[key]

    def _next_order(self) -> int:
        self._order += 1
        return self._order


def check_address(address: str, *, allow_empty: bool = False) -> str:
    """A relay address is `host:port` (a name, an IPv4 or a bracketed IPv6 address)."""
    if (allow_empty and not address) or ADDRESS.match(address):
        return address
    raise InvalidRequest(
        f"relay address {address[:80]!r} is not host:port; set CADENCE_RELAY_ADDR to an address other replicas reach"
    )
