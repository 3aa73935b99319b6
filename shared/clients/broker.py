"""Client of the weight-sync broker, behind a small `WeightTransport` interface.

The trainer calls `publish(state_dict, version)`; inference workers `watch(after)` and `fetch(version)` (or
`fetch_tensors(version)` to load layer by layer while the rest still streams). Every chunk is verified by
sha256 as it arrives, and the whole payload at the end; tensors come back bit for bit (bf16 included).
Dropped connections are retried with exponential backoff, and a fetch resumes from its last verified chunk.

`make_transport(kind, ...)` picks the implementation; a same-cluster collective path (torch.distributed
broadcast coordinated by the broker) can be added there without touching callers.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from cadence import errors
from cadence.grpc import channel
from cadence.logging import get_logger
from cadence.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from cadence.weights import Assembler, Packed, iter_chunks, iter_tensors, pack

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
    ) -> None:
        self.target = target
        self.run_id = run_id
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._channel = channel(target)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> VersionInfo:
        return self.publish_packed(pack(state_dict, run_id=self.run_id, version=version))

    def publish_packed(self, packed: Packed) -> VersionInfo:
        """Upload an already packed version (a retry re-sends it whole: the broker keeps no partial upload)."""
        return self._call(
            "Publish",
            lambda: self._stub.Publish(iter_chunks(packed.manifest, packed.payload), timeout=self.stream_timeout),
        )

    def latest(self) -> VersionInfo | None:
        request = broker_pb2.LatestRequest(run_id=self.run_id)
        try:
            return self._call("Latest", lambda: self._stub.Latest(request, timeout=self.timeout))
        except errors.NotFound:
            return None

    def status(self) -> broker_pb2.BrokerStatus:
        """Versions held, stored bytes, fetches and watches in progress."""
        request = broker_pb2.BrokerStatusRequest()
        return self._call("Status", lambda: self._stub.Status(request, timeout=self.timeout))

    def watch(self, after_version: int = -1) -> Iterator[VersionInfo]:
        last, failures = after_version, 0
        while True:
            call = self._stub.Watch(broker_pb2.WatchRequest(run_id=self.run_id, after_version=last))
            try:
                for info in call:
                    failures = 0
                    if info.version > last:
                        last = info.version
                        yield info
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE:
                    raise self._error("Watch", error) from None
                failures += 1
                log.warning("watch interrupted; reconnecting", extra={"target": self.target, "code": error.code().name})
            finally:
                call.cancel()
            # A clean end means the broker is draining: reconnect (to its replacement) after a pause.
            time.sleep(self._delay(failures))

    def fetch_tensors(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        assembler: Assembler | None = None
        yielded, failures = 0, 0
        while True:
            offset = assembler.received if assembler is not None else 0
            request = broker_pb2.FetchRequest(run_id=self.run_id, version=version, offset=offset)
            call = self._stub.Fetch(request, timeout=self.stream_timeout)
            try:
                for message in call:
                    if message.WhichOneof("body") == "manifest":
                        assembler = self._start(assembler, message.manifest, version)
                        continue
                    if assembler is None:
                        raise errors.IntegrityError("the broker sent data before the manifest")
                    assembler.add(message.data, message.offset)
                    failures = 0
                    yield from self._ready(assembler, yielded, assembler.received)
                    yielded = self._count_ready(assembler, assembler.received)
                if assembler is not None and assembler.complete:
                    assembler.finish()
                    yield from self._ready(assembler, yielded, assembler.received + 1)
                    return
                failure = "the stream ended early"
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE:
                    raise self._error("Fetch", error) from None
                failure = f"{error.code().name}: {error.details()}"
            except errors.IntegrityError as error:
                failure = str(error)  # a damaged chunk was refused: fetch again from the last verified one
            finally:
                call.cancel()
            failures += 1
            if failures > self.retries:
                raise errors.NotReady(
                    f"fetch of version {version} from {self.target} failed {failures} times in a row "
                    f"(last: {failure}); check the broker's health and the network"
                )
            log.warning("fetch interrupted; resuming", extra={"version": version, "offset": offset, "why": failure})
            time.sleep(self._delay(failures))

    def close(self) -> None:
        self._channel.close()

    # -- helpers ------------------------------------------------------------------------------------------

    def _start(self, assembler: Assembler | None, manifest: common_pb2.WeightManifest, version: int) -> Assembler:
        """A new assembler for the first manifest; on resume, check it is still the same payload."""
        if manifest.version != version or manifest.run_id != self.run_id:
            raise errors.IntegrityError(
                f"asked for run {self.run_id!r} version {version}, got {manifest.run_id!r} {manifest.version}"
            )
        if assembler is None:
            return Assembler(manifest)
        if manifest.sha256 != assembler.manifest.sha256:
            raise errors.IntegrityError(f"version {version} changed between resumed fetches; fetch it again")
        return assembler

    @staticmethod
    def _count_ready(assembler: Assembler, received: int) -> int:
        specs = assembler.manifest.tensors
        return sum(1 for spec in specs if spec.offset + spec.nbytes <= received and spec.offset < received + 1)

    @staticmethod
    def _ready(assembler: Assembler, start: int, limit: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors `start`… whose bytes lie below `limit` (views into the verified buffer)."""
        specs = assembler.manifest.tensors
        end = start
        while end < len(specs) and specs[end].offset + specs[end].nbytes <= limit and specs[end].offset < limit:
            end += 1
        if end > start:
            partial = common_pb2.WeightManifest(tensors=specs[start:end])
            yield from iter_tensors(partial, assembler.buffer)

    def _call(self, method: str, fn: Callable[[], T]) -> T:
        """Run a unary or client-streaming call, retrying transient failures with backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE or attempt == self.retries:
                    raise self._error(method, error) from None
                log.warning("%s failed (%s); retrying", method, error.code().name, extra={"target": self.target})
                time.sleep(self._delay(attempt + 1))
        raise AssertionError("unreachable")

    def _delay(self, failures: int) -> float:
        """Exponential backoff with jitter, capped."""
        if failures <= 0:
            return 0.05
        return min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * (0.5 + random.random() / 2)

    def _error(self, method: str, error: grpc.RpcError) -> errors.CadenceError:
        cls = _ERRORS.get(error.code(), errors.CadenceError)
        return cls(f"broker {self.target} {method}: {error.details()}")


TRANSPORTS: dict[str, Callable[..., WeightTransport]] = {"broker": BrokerClient}


def make_transport(kind: str, target: str, run_id: str, **options: Any) -> WeightTransport:
    """The weight transport named `kind` (today: `broker`)."""
    if kind not in TRANSPORTS:
        raise errors.ConfigError(f"weight transport {kind!r} is unknown; valid types: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[kind](target, run_id, **options)
