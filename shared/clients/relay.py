"""Relay fan-out, the replica's side: serve the chunks it has verified to other replicas, fetch from them.

A `BrokerClient` given a `Relay` asks the broker for a route before each fetch (`Broker.Route`, the routing
rules are in `cadence.broker.relay`): the broker's manifest, whose digests every chunk is checked against, and
the relay to fetch from, or the broker itself. The fetcher sends that relay the same `FetchRequest` it would
send the broker: a relay serves the broker's own `Fetch` surface (same messages, resumable from an offset)
from the bytes it has verified of the version it is fetching or fetched last, each chunk as soon as its digest
matched, so replicas that start together stream through one another (broker → A → B → C) and the broker
sends about one copy. A relay that fails (dead, unreachable, moved on to another version, or it sent a
chunk that fails the broker's digest) is reported with the next route request and the fetch resumes from
its last verified chunk from another relay or the broker.

A `Relay` without a server still takes routes (it fetches from relays but serves nobody): a replica with no
address the others can reach works as before, it just does not add to the fan-out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from cadence import weights_delta, weights_wire
from cadence.errors import InvalidRequest, NotReady, VersionNotFound
from cadence.grpc import ServiceServer, channel
from cadence.logging import get_logger
from cadence.net import reachable_host
from cadence.v1 import broker_pb2, common_pb2

log = get_logger(__name__)

RELAY_BYTES_OUT = Counter("cadence_relay_bytes_out", "Payload bytes this replica relayed to other replicas")
RELAY_BYTES_IN = Counter("cadence_relay_bytes_in", "Payload bytes this replica fetched from relays, not the broker")
RELAY_FAILOVERS = Counter("cadence_relay_failovers", "Relays that failed this replica mid-fetch and were routed around")

WAIT_SECONDS = 30.0
"""How long a relay waits for a chunk it has not verified yet before it gives the fetcher up (who re-routes)."""


@dataclass
class _Held:
    """The version a relay serves: the manifest as it received it, its buffer, the verified prefix."""

    manifest: common_pb2.WeightManifest
    buffer: bytearray | memoryview
    verified: int = 0

    @property
    def carrier(self) -> common_pb2.WeightManifest:
        """The manifest of the bytes on the wire (a delta's transport, or the version itself)."""
        return weights_delta.transport(self.manifest) if weights_delta.is_delta(self.manifest) else self.manifest


class RelaySource:
    """What a replica relays: one version at a time, served chunk by chunk as its fetch verifies them; in
    up to two forms, the delta it fetched and the full version it rebuilds from it (or the full version alone)."""

    def __init__(self, wait_seconds: float = WAIT_SECONDS) -> None:
        self.wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._forms: dict[bool, _Held] = {}  # by "is a delta"

    def hold(self, manifest: common_pb2.WeightManifest, buffer: bytearray | memoryview) -> None:
        """Serve `buffer` (filled by a fetch of `manifest`, or rebuilt into) as far as `progress` says."""
        with self._cond:
            self._forms[weights_delta.is_delta(manifest)] = _Held(manifest, buffer)
            self._cond.notify_all()

    def progress(self, verified: int, delta: bool) -> None:
        """The first `verified` bytes of the form held matched the broker's digests."""
        with self._cond:
            held = self._forms.get(delta)
            if held is not None and verified > held.verified:
                held.verified = verified
                self._cond.notify_all()

    def retire(self) -> None:
        """Stop serving (the buffers are about to change); returns once no chunk is being copied out of them."""
        with self._cond:
            self._forms = {}
            self._cond.notify_all()

    def serve(self, request: broker_pb2.FetchRequest, active: Callable[[], bool]) -> Iterator[object]:
        """The manifest, then pre-framed chunks from `request.offset` on, as the broker's `Fetch` sends them."""
        deadline = time.monotonic() + self.wait_seconds
        with self._cond:  # routed here as soon as this relay asked for the version: its fetch may not have begun
            while _awaits(held := self._pick(request), request) and active() and time.monotonic() < deadline:
                self._cond.wait(0.5)
        if held is None or not _holds(held, request):
            what = "nothing" if held is None else f"version {held.manifest.version} of run {held.manifest.run_id!r}"
            raise VersionNotFound(
                f"this replica relays {what}, not version {request.version} of run {request.run_id!r}; "
                "ask the broker for another route"
            )
        carrier = held.carrier
        if request.offset % carrier.chunk_size or request.offset > carrier.total_bytes:
            raise InvalidRequest(f"offset {request.offset} is not a chunk boundary of this version")
        yield common_pb2.WeightChunk(manifest=held.manifest)
        for start in range(request.offset, carrier.total_bytes, carrier.chunk_size):
            end = min(start + carrier.chunk_size, carrier.total_bytes)
            yield self._framed(held, start, end, active)
            RELAY_BYTES_OUT.inc(end - start)

    def _pick(self, request: broker_pb2.FetchRequest) -> _Held | None:
        """The delta to a fetcher holding its base (as the broker decides), else the full version."""
        delta = self._forms.get(True)
        if delta is not None and request.HasField("base_version"):
            base = (delta.manifest.delta.base_version, delta.manifest.delta.base_sha256)
            if (request.base_version, request.base_sha256) == base:
                return delta
        return self._forms.get(False)

    def _framed(self, held: _Held, start: int, end: int, active: Callable[[], bool]) -> bytes:
        """Chunk `start:end` once verified, copied out under the lock (so `retire` never races a copy)."""
        deadline = time.monotonic() + self.wait_seconds
        form = weights_delta.is_delta(held.manifest)
        with self._cond:
            while self._forms.get(form) is held and held.verified < end and active():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotReady(f"this relay has not verified bytes {start}..{end} in {self.wait_seconds:.0f} s")
                self._cond.wait(min(left, 0.5))
            if self._forms.get(form) is not held:
                raise NotReady("this relay moved on to another version; ask the broker for another route")
            if not active():
                raise NotReady("the fetch was cancelled")
            return weights_wire.frame(memoryview(held.buffer)[start:end], start)


def _holds(held: _Held | None, request: broker_pb2.FetchRequest) -> bool:
    return held is not None and (held.manifest.run_id, held.manifest.version) == (request.run_id, request.version)


def _awaits(held: _Held | None, request: broker_pb2.FetchRequest) -> bool:
    """Not there yet, but coming: nothing held, or an older version of the run (a relay never goes back)."""
    return held is None or (held.manifest.run_id == request.run_id and held.manifest.version < request.version)


class RelayServer:
    """The `cadence.v1.Broker/Fetch` surface (only that method) over a `RelaySource`, on its own port."""

    def __init__(self, source: RelaySource, host: str, port: int, advertise: str = "", max_streams: int = 16) -> None:
        self.source = source
        self.host, self._advertise = host, advertise
        self.server = ServiceServer("relay", host, port, max_workers=max_streams)
        self.server.add_servicer(_add_fetch, source, "cadence.v1.Broker")
        self.address = ""

    def start(self) -> str:
        """Bind and serve; returns the address other replicas are told to fetch from."""
        port = self.server.start()
        self.address = self._advertise or f"{reachable_host(self.host)}:{port}"
        log.info("relay serving", extra={"address": self.address})
        return self.address

    def stop(self, grace: float = 1.0) -> None:
        self.source.retire()
        self.server.stop(grace)


def _add_fetch(source: RelaySource, server: grpc.Server) -> None:
    def fetch(request: broker_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[object]:
        return source.serve(request, context.is_active)

    handler = grpc.unary_stream_rpc_method_handler(
        fetch, request_deserializer=broker_pb2.FetchRequest.FromString, response_serializer=weights_wire.encode
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("cadence.v1.Broker", {"Fetch": handler}),))


class Relay:
    """A replica's part in relay fan-out, shared by its `BrokerClient`s: the source it serves (none without a
    server) and channels to the relays it fetches from."""

    def __init__(self, server: RelayServer | None = None) -> None:
        self.server = server
        self.address = server.address if server is not None else ""
        self._channels: dict[str, tuple[grpc.Channel, Callable[..., grpc.Call]]] = {}
        self._lock = threading.Lock()

    def hold(self, manifest: common_pb2.WeightManifest, buffer: bytearray | memoryview) -> None:
        if self.server is not None:
            self.server.source.hold(manifest, buffer)

    def progress(self, verified: int, delta: bool = False) -> None:
        if self.server is not None:
            self.server.source.progress(verified, delta)

    def retire(self) -> None:
        if self.server is not None:
            self.server.source.retire()

    def fetcher(self, address: str) -> Callable[..., grpc.Call]:
        """The `Fetch` call of the relay at `address` (one channel per relay, kept)."""
        with self._lock:
            if address not in self._channels:
                chan = channel(address)
                call = chan.unary_stream(
                    "/cadence.v1.Broker/Fetch",
                    request_serializer=broker_pb2.FetchRequest.SerializeToString,
                    response_deserializer=weights_wire.decode,
                )
                self._channels[address] = (chan, call)
            return self._channels[address][1]

    def failed(self, address: str, why: str, version: int) -> None:
        """Forget the channel of a relay that failed us (it may be gone for good)."""
        RELAY_FAILOVERS.inc()
        log.warning("relay failed; routing around it", extra={"relay": address, "version": version, "why": why})
        with self._lock:
            entry = self._channels.pop(address, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        """Close the channels to other relays (the server, if any, is its owner's to stop)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for chan, _ in channels:
            chan.close()


def start_relay(host: str, port: int, advertise: str = "") -> Relay:
    """A `Relay` serving on `host:port` (port 0: any free one), announced to the broker as `advertise` (default:
    the bound address, or this host's IP for a wildcard bind)."""
    server = RelayServer(RelaySource(), host, port, advertise)
    server.start()
    return Relay(server)
