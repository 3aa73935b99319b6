"""Client of the weight-sync broker, behind a small `WeightTransport` interface.

The trainer calls `publish(state_dict, version)`; inference workers `watch(after)` and `fetch(version)` (or
`fetch_tensors(version)` to load layer by layer while the rest still streams). Every chunk is verified by
sha256 as it arrives, and the whole payload at the end; tensors come back bit for bit (bf16 included).
Dropped connections are retried with exponential backoff, and a fetch resumes from its last verified chunk.
Versions travel as deltas against the one before where that pays (`cadence.weights_delta`; the broker's
README says when); what a fetch yields is always checked against the full version's digests.

`make_transport(kind, ...)` picks the implementation; the collective path's group calls go through `unary`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from cadence import errors, weights_delta, weights_wire
from cadence.clients.relay import RELAY_BYTES_IN, Relay
from cadence.grpc import channel
from cadence.logging import get_logger
from cadence.retry import Backoff, Retry, retry
from cadence.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from cadence.weights import Assembler, Packed, iter_tensors, pack, verify_payload
from cadence.weights_wire import iter_frames

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

VersionInfo = common_pb2.VersionInfo
T = TypeVar("T")

# Transient: the broker restarts, drains, sheds load, or bytes were damaged on the way (fetch only).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
_ERRORS: dict[grpc.StatusCode, type[errors.CadenceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.NOT_FOUND: errors.VersionNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Conflict,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
    grpc.StatusCode.UNAVAILABLE: errors.NotReady,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.NotReady,
}
MAX_FAILED = 16  # relays routed around in one fetch before it takes the rest from the broker alone


def _transient(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in _RETRYABLE


class WeightTransport(ABC):
    """Moves versioned weights from the trainer to the inference fleet."""

    @abstractmethod
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> VersionInfo:
        """Upload a version; it becomes visible once complete and verified."""

    @abstractmethod
    def latest(self) -> VersionInfo | None:
        """The newest visible version, or None before the first publish."""

    @abstractmethod
    def watch(self, after_version: int = -1) -> Iterator[VersionInfo]:
        """The latest version if newer than `after_version`, then each new one in order (never ends)."""

    @abstractmethod
    def fetch_tensors(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Each verified tensor of a version as soon as its bytes have arrived, in manifest order."""

    def fetch(self, version: int) -> dict[str, torch.Tensor]:
        """A whole version as a state dict."""
        return dict(self.fetch_tensors(version))

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> WeightTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrokerClient(WeightTransport):
    """`WeightTransport` over the broker's gRPC API (`cadence.v1.Broker`) for one run."""

    def __init__(
        self,
        target: str,
        run_id: str,
        *,
        timeout: float = 10.0,
        stream_timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        keyframe_every: int = 10,
        apply_deltas: bool = False,
        relay: Relay | None = None,
    ) -> None:
        """`keyframe_every`: publish every n-th version in full and the others as deltas against the version
        before (1: always full); the last published payload is kept for that. `apply_deltas`: keep the last
        fetched version and fetch the next as a delta applied onto it in place, so the tensors a fetch
        yields are views that the next fetch overwrites (copy them to keep them). `relay`: take each fetch's
        route from the broker and fetch from other replicas (`cadence.clients.relay`); with a relay server,
        serve what this client fetches to them too."""
        self.target = target
        self.run_id = run_id
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries
        self.backoff = Backoff(backoff, cap=max_backoff, jitter=True)
        self.keyframe_every = max(1, keyframe_every)
        self.apply_deltas = apply_deltas
        self.relay = relay
        self._sent: Packed | None = None  # the last version published, and how many deltas followed a keyframe
        self._deltas_sent = 0
        self._held: Packed | None = None  # the last version fetched (with `apply_deltas`), verified
        self._closed = False
        self._channel = channel(target)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        # Weight chunks skip protobuf's extra copies (`cadence.weights_wire`); the bytes are the same.
        self._publish = self._channel.stream_unary(
            "/cadence.v1.Broker/Publish",
            request_serializer=weights_wire.encode,
            response_deserializer=common_pb2.VersionInfo.FromString,
        )
        self._fetch = self._channel.unary_stream(
            "/cadence.v1.Broker/Fetch",
            request_serializer=broker_pb2.FetchRequest.SerializeToString,
            response_deserializer=weights_wire.decode,
        )

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> VersionInfo:
        return self.publish_packed(pack(state_dict, run_id=self.run_id, version=version))

    def publish_packed(self, packed: Packed) -> VersionInfo:
        """Upload an already packed version, as a delta against the last one when it pays (a retry re-sends
        it whole: the broker keeps no partial upload). A delta the broker cannot apply goes as a keyframe."""
        due = self._sent is None or self._deltas_sent + 1 >= self.keyframe_every
        delta = None if due or self._sent is None else weights_delta.against(self._sent, packed)
        info = None
        if delta is not None:
            try:
                info = self._upload(delta)
            except (errors.Conflict, errors.IntegrityError) as error:
                log.warning("delta refused (%s); publishing version %d in full", error, packed.manifest.version)
        if info is None:
            delta, info = None, self._upload(packed)
        self._sent, self._deltas_sent = packed, 0 if delta is None else self._deltas_sent + 1
        return info

    def _upload(self, packed: Packed) -> VersionInfo:
        return self._call(
            "Publish",
            lambda: self._publish(iter_frames(packed.manifest, packed.payload), timeout=self.stream_timeout),
        )

    def latest(self) -> VersionInfo | None:
        try:
            return self.unary("Latest", broker_pb2.LatestRequest(run_id=self.run_id))
        except errors.NotFound:
            return None

    def status(self) -> broker_pb2.BrokerStatus:
        """Versions held, stored bytes, fetches and watches in progress."""
        return self.unary("Status", broker_pb2.BrokerStatusRequest())

    def unary(self, method: str, request: Any) -> Any:
        """A unary call by name (`JoinGroup` and `FormGroup`: `cadence.broker.groups`), retried like the rest."""
        return self._call(method, lambda: getattr(self._stub, method)(request, timeout=self.timeout))

    def watch(self, after_version: int = -1) -> Iterator[VersionInfo]:
        last, failures = after_version, 0
        while not self._closed:
            call = self._stub.Watch(broker_pb2.WatchRequest(run_id=self.run_id, after_version=last))
            try:
                for info in call:
                    failures = 0
                    if info.version > last:
                        last = info.version
                        yield info
            except grpc.RpcError as error:
                if self._closed:
                    return  # `close()` from another thread ends the watch
                if error.code() not in _RETRYABLE:
                    raise self._error("Watch", error) from None
                log.warning("watch interrupted; reconnecting", extra={"target": self.target, "code": error.code().name})
            finally:
                call.cancel()
            # Ended (a clean end means the broker is draining) or failed: reconnect, backing off while it lasts.
            failures += 1
            time.sleep(self.backoff.delay(failures))

    def fetch_tensors(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        state, failed = _Fetch(version), []
        loop = Retry(self.backoff, attempts=self.retries)
        if self.relay is not None:
            self.relay.retire()  # the buffers it serves may be written from here on
        while True:
            offset = state.assembler.received if state.assembler is not None else 0
            request = broker_pb2.FetchRequest(run_id=self.run_id, version=version, offset=offset)
            if self._held is not None and self._held.manifest.version < version:
                request.base_version, request.base_sha256 = self._held.manifest.version, self._held.manifest.sha256
            upstream = self._route(state, request, failed)
            fetch = self.relay.fetcher(upstream) if upstream and self.relay else self._fetch
            call = fetch(request, timeout=self.stream_timeout)
            try:
                for message in call:
                    loop.succeeded()
                    yield from self._receive(state, message, relayed=bool(upstream))
                if state.payload is not None:
                    if self.apply_deltas:
                        self._held = Packed(state.manifest, state.payload)
                    return
                failure = "the stream ended early"
            except grpc.RpcError as error:
                if not upstream and error.code() not in _RETRYABLE:
                    raise self._error("Fetch", error) from None
                failure = f"{error.code().name}: {error.details()}"
            except _BadRebuild as error:  # not a relay's fault: the delta matched the broker's digests
                failure, self._held, state, upstream = str(error), None, _Fetch(version), ""  # fetch in full
            except errors.IntegrityError as error:
                if not (upstream or isinstance(error, _DamagedChunk)):
                    raise
                failure = str(error)  # refused: fetch again from the last verified chunk
            finally:
                call.cancel()
            if upstream and self.relay is not None:  # a relay failed us: route around it at once
                self.relay.failed(upstream, failure, version)
                failed.append(upstream)
                continue
            delay = loop.failed()
            if delay is None:
                raise errors.NotReady(
                    f"fetch of version {version} from {self.target} failed {loop.failures} times in a row "
                    f"(last: {failure}); check the broker's health and the network"
                )
            log.warning("fetch interrupted; resuming", extra={"version": version, "offset": offset, "why": failure})
            time.sleep(delay)

    def close(self) -> None:
        self._closed = True
        self._channel.close()
        if self.relay is not None:
            self.relay.close()

    # -- helpers ------------------------------------------------------------------------------------------

    def _route(self, state: _Fetch, request: broker_pb2.FetchRequest, failed: list[str]) -> str:
        """The relay to fetch from ("": the broker), as the broker routes it; its manifest starts the assembly."""
        if self.relay is None or len(failed) >= MAX_FAILED:
            return ""
        ask = broker_pb2.RouteRequest(fetch=request, relay_addr=self.relay.address, failed=failed)
        try:
            route = retry(
                lambda: self._stub.Route(ask, timeout=self.timeout),
                Retry(self.backoff, attempts=self.retries),
                retry_on=_transient,
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self._error("Route", error) from None
            log.warning("broker %s does not route fetches; fetching from it alone", self.target)
            self.relay = None
            return ""
        self._check_manifest(state, route.manifest)
        return route.upstream

    def _receive(
        self, state: _Fetch, message: common_pb2.WeightManifest | weights_wire.DataChunk | None, relayed: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Take one message; yield the tensors it completes."""
        if isinstance(message, common_pb2.WeightManifest):
            self._check_manifest(state, message)
            return
        if state.assembler is None or message is None:
            raise errors.IntegrityError("the broker sent something other than the manifest and then data chunks")
        try:  # a damaged chunk shows up in the `add` of a later chunk or in `finish` (verification is pipelined)
            state.assembler.add(message.data, message.offset)
            done = state.assembler.finish() if state.assembler.complete else None
        except errors.IntegrityError as error:
            raise _DamagedChunk(str(error)) from error
        if relayed:
            RELAY_BYTES_IN.inc(len(message.data))
        if self.relay is not None:
            self.relay.progress(state.assembler.verified, delta=weights_delta.is_delta(state.manifest))
        if not weights_delta.is_delta(state.manifest):
            state.payload = done
            yield from state.ready()
        elif done is not None:
            yield from self._rebuild(state, done)

    def _rebuild(self, state: _Fetch, delta: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Apply a received delta onto the held version in place and check it against the full digests."""
        assert self._held is not None
        held, self._held = self._held, None  # changed in place from here on: never a base again unless verified
        target = weights_delta.full(state.manifest)
        try:
            weights_delta.apply(held.payload, delta)
            verify_payload(target, held.payload)
        except errors.IntegrityError as error:
            raise _BadRebuild(f"version {state.version} rebuilt from its delta is not the trainer's: {error}") from None
        if self.relay is not None:
            self.relay.progress(target.total_bytes)
        state.manifest, state.payload = target, held.payload
        yield from iter_tensors(target, held.payload)

    def _check_manifest(self, state: _Fetch, manifest: common_pb2.WeightManifest) -> None:
        """Start assembling on the first manifest; on a resume, insist on the same payload."""
        if manifest.version != state.version or manifest.run_id != self.run_id:
            raise errors.IntegrityError(
                f"asked for run {self.run_id!r} version {state.version}, got {manifest.run_id!r} {manifest.version}"
            )
        if state.assembler is None:
            if weights_delta.is_delta(manifest):
                held = self._held
                if held is None or (held.manifest.version, held.manifest.sha256) != (
                    manifest.delta.base_version,
                    manifest.delta.base_sha256,
                ):
                    raise errors.IntegrityError("the broker sent a delta against a version this fetcher lacks")
                state.assembler = Assembler(weights_delta.transport(manifest))
                if self.relay is not None:  # relayed in full once rebuilt from the delta (`_rebuild`)
                    self.relay.hold(weights_delta.full(manifest), held.payload)
            else:
                state.assembler = Assembler(manifest, buffer=self._reusable(manifest))
            state.manifest = manifest
            if self.relay is not None:
                self.relay.hold(manifest, state.assembler.buffer)
        elif manifest != state.manifest:
            raise errors.IntegrityError(f"version {state.version} changed between resumed fetches; fetch it again")

    def _reusable(self, manifest: common_pb2.WeightManifest) -> Any:
        """The held version's buffer, to receive a full version of the same size into (it stops being a base)."""
        held, self._held = self._held, None
        return held.payload if held is not None and len(held.payload) == manifest.total_bytes else None

    def _call(self, method: str, fn: Callable[[], T]) -> T:
        """Run a unary or client-streaming call, retrying transient failures with backoff."""

        def warn(error: BaseException, _: float) -> None:
            log.warning("%s failed (%s); retrying", method, error.code().name, extra={"target": self.target})

        try:
            return retry(fn, Retry(self.backoff, attempts=self.retries), retry_on=_transient, on_retry=warn)
        except grpc.RpcError as error:
            raise self._error(method, error) from None

    def _error(self, method: str, error: grpc.RpcError) -> errors.CadenceError:
        cls = _ERRORS.get(error.code(), errors.CadenceError)
        return cls(f"broker {self.target} {method}: {error.details()}")


class _DamagedChunk(errors.IntegrityError):
    """A chunk failed verification on the way: worth fetching again (a bad manifest is not)."""


class _BadRebuild(errors.IntegrityError):
    """A delta applied onto the held version did not rebuild the version's digests: fetch it in full."""


class _Fetch:
    """Progress of one fetch across reconnects: the verified bytes so far and the tensors handed out."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.assembler: Assembler | None = None
        self.manifest = common_pb2.WeightManifest()  # as sent: a delta's, until it is applied
        self.payload: Any = None  # the whole version, verified, once it is complete
        self.yielded = 0

    def ready(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors not yet handed out whose bytes are all verified (zero-copy views into the buffer)."""
        assert self.assembler is not None
        specs = self.assembler.manifest.tensors
        end = self.yielded
        while end < len(specs) and specs[end].offset + specs[end].nbytes <= self.assembler.verified:
            end += 1
        if end > self.yielded:
            done = common_pb2.WeightManifest(tensors=specs[self.yielded : end])
            self.yielded = end
            yield from iter_tensors(done, self.assembler.buffer)


TRANSPORTS: dict[str, Callable[..., WeightTransport]] = {"broker": BrokerClient}


def make_transport(kind: str, target: str, run_id: str, **options: Any) -> WeightTransport:
    """The weight transport named `kind` (today: `broker`)."""
    if kind not in TRANSPORTS:
        raise errors.ConfigError(f"weight transport {kind!r} is unknown; valid types: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[kind](target, run_id, **options)
