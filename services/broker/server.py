"""The `cadence.v1.Broker` servicer: a thin gRPC shell around `WeightStore`, plus its Prometheus metrics.

Publish verifies every chunk as it arrives (`cadence.weights.Assembler`) and hands the store a complete,
verified payload, so a publisher that disconnects midway leaves nothing visible. Errors are raised as
`cadence.errors` types; the interceptor in `cadence.grpc` maps them to status codes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge, Histogram

from cadence import weights_delta
from cadence.broker.groups import Group, GroupTable
from cadence.broker.relay import RelayTable
from cadence.broker.store import Payload, Reader, WeightStore, check_run_id
from cadence.errors import IntegrityError, InvalidRequest, NotFound, Overloaded
from cadence.logging import get_logger
from cadence.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from cadence.weights import Assembler
from cadence.weights_wire import DataChunk, decode, encode, iter_frames

log = get_logger(__name__)

_SIZE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
VERSIONS = Gauge("cadence_broker_versions", "Visible weight versions held")
STORED_BYTES = Gauge("cadence_broker_stored_bytes", "Payload bytes held (evicted versions still being read included)")
STAGING_BYTES = Gauge("cadence_broker_staging_bytes", "Payload bytes of publishes in flight")
BYTES_IN = Counter("cadence_broker_bytes_in", "Payload bytes received by Publish")
BYTES_OUT = Counter("cadence_broker_bytes_out", "Payload bytes sent by Fetch")
ACTIVE_FETCHES = Gauge("cadence_broker_active_fetches", "Fetch streams in progress")
WATCHERS = Gauge("cadence_broker_watchers", "Watch streams open")
PUBLISH_SECONDS = Histogram("cadence_broker_publish_seconds", "Publish duration (accepted)", buckets=_SIZE_BUCKETS)
FETCH_SECONDS = Histogram("cadence_broker_fetch_seconds", "Fetch duration (complete)", buckets=_SIZE_BUCKETS)
PUBLISH_FAILURES = Counter("cadence_broker_publish_failures", "Publishes refused or abandoned", ["reason"])
FETCH_RESUMES = Counter("cadence_broker_fetch_resumes", "Fetches that resumed from a non-zero offset")
DELTA_FETCHES = Counter("cadence_broker_delta_fetches", "Fetches served as a delta against the fetcher's version")
ROUTES = Counter("cadence_broker_routes", "Fetch routes handed out, by upstream", ["upstream"])
RELAYS = Gauge("cadence_broker_relays", "Replicas registered as relays of a held version")
GROUP_MEMBERS = Gauge("cadence_broker_group_members", "Replicas in the current broadcast groups")


Frame = common_pb2.WeightManifest | DataChunk | None  # what `cadence.weights_wire.decode` yields


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    """Decode, call the store, encode."""

    def __init__(self, store: WeightStore, *, max_streams: int = 56, poll_seconds: float = 0.5) -> None:
        self.store = store
        self.max_streams = max_streams
        self.poll_seconds = poll_seconds
        self.relays = RelayTable()
        self.groups = GroupTable()
        self._bytes_out = 0  # what BYTES_OUT counts, for Status (a metric's value is not for reading back)
        self._bytes_out_lock = threading.Lock()
        RELAYS.set_function(self.relays.count)
        GROUP_MEMBERS.set_function(self.groups.count)
        VERSIONS.set_function(lambda: len(self.store.versions()))
        STORED_BYTES.set_function(lambda: self.store.stats().stored_bytes)
        STAGING_BYTES.set_function(lambda: self.store.stats().staging_bytes)
        WATCHERS.set_function(lambda: self.store.stats().watchers)
        ACTIVE_FETCHES.set_function(lambda: self.store.stats().active_reads)

    def Publish(self, request_iterator: Iterator[Frame], context: grpc.ServicerContext) -> common_pb2.VersionInfo:
        started = time.monotonic()
        try:
            info = self._publish(request_iterator)
        except Exception as error:
            reason = "cancelled" if not context.is_active() else type(error).__name__
            PUBLISH_FAILURES.labels(reason=reason).inc()
            raise
        PUBLISH_SECONDS.observe(time.monotonic() - started)
        return info

    def _publish(self, request_iterator: Iterator[Frame]) -> common_pb2.VersionInfo:
        manifest = next(request_iterator, None)
        if not isinstance(manifest, common_pb2.WeightManifest):
            raise InvalidRequest("a Publish stream starts with the manifest, then the data chunks")
        existing = self.store.check_publish(manifest)
        if existing is not None:
            log.info("idempotent re-publish", extra={"run_id": manifest.run_id, "version": manifest.version})
            return existing
        with self.store.reserve(manifest.total_bytes):
            delta = weights_delta.is_delta(manifest)
            carrier = weights_delta.transport(manifest) if delta else manifest
            assembler = Assembler(carrier, buffer=self.store.receive_buffer(carrier.total_bytes))
            for chunk in request_iterator:
                if not isinstance(chunk, DataChunk):
                    raise InvalidRequest("only data chunks may follow the manifest in a Publish stream")
                if assembler.complete:
                    raise IntegrityError(f"data beyond the manifest's {assembler.manifest.total_bytes} bytes")
                assembler.add(chunk.data, chunk.offset)
                BYTES_IN.inc(len(chunk.data))
            return self.store.put(manifest, assembler.finish())

    def Latest(self, request: broker_pb2.LatestRequest, context: grpc.ServicerContext) -> common_pb2.VersionInfo:
        latest = self.store.latest(check_run_id(request.run_id))
        if latest is None:
            raise NotFound(f"run {request.run_id!r} has no published version yet; wait for the trainer's first publish")
        return latest

    def Watch(
        self, request: broker_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.VersionInfo]:
        run_id = check_run_id(request.run_id)
        self._admit_stream("Watch")
        # The stream ends cleanly (OK) when the broker drains; clients then reconnect to its replacement.
        yield from self.store.watch(
            run_id, request.after_version, should_stop=lambda: not context.is_active(), poll=self.poll_seconds
        )

    def Fetch(
        self, request: broker_pb2.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.WeightChunk | bytes]:
        self._admit_stream("Fetch")
        reader = self.store.open(check_run_id(request.run_id), request.version)
        context.add_callback(reader.close)  # a cancelled stream may never resume the generator
        started = time.monotonic()
        try:
            if request.offset:
                FETCH_RESUMES.inc()
            sent, payload = self._what_to_send(reader, request)
            carrier = weights_delta.transport(sent) if weights_delta.is_delta(sent) else sent
            frames = iter_frames(sent, payload, request.offset)
            yield next(frames)  # the manifest (once the offset is checked)
            for start, frame in zip(
                range(request.offset, carrier.total_bytes, carrier.chunk_size), frames, strict=True
            ):
                yield frame
                self._sent(min(carrier.chunk_size, carrier.total_bytes - start))
            FETCH_SECONDS.observe(time.monotonic() - started)
        finally:
            reader.close()

    def _sent(self, nbytes: int) -> None:
        BYTES_OUT.inc(nbytes)
        with self._bytes_out_lock:
            self._bytes_out += nbytes

    def _what_to_send(
        self, reader: Reader, request: broker_pb2.FetchRequest
    ) -> tuple[common_pb2.WeightManifest, Payload]:
        """The manifest to send and the bytes it describes: the stored delta when the fetcher holds its base,
        else the full version (rebuilt if it is stored as a delta)."""
        if _sends_delta(reader.manifest, request):
            DELTA_FETCHES.inc()
            return reader.manifest, reader.payload
        full = self.store.full(reader)
        return full.manifest, full.payload

    def Route(self, request: broker_pb2.RouteRequest, context: grpc.ServicerContext) -> broker_pb2.FetchRoute:
        """The manifest a Fetch would send and the relay to take it from (`cadence.broker.relay`)."""
        fetch = request.fetch
        run_id = check_run_id(fetch.run_id)
        with self.store.open(run_id, fetch.version) as reader:
            delta = _sends_delta(reader.manifest, fetch)
            manifest = reader.manifest
            if weights_delta.is_delta(manifest) and not delta:
                manifest = weights_delta.full(manifest)  # served rebuilt, as Fetch does
        self.relays.prune(run_id, {info.version for info in self.store.versions(run_id)})
        upstream = self.relays.route((run_id, fetch.version, delta), request.relay_addr, request.failed)
        ROUTES.labels(upstream="relay" if upstream else "broker").inc()
        return broker_pb2.FetchRoute(manifest=manifest, upstream=upstream)

    def JoinGroup(
        self, request: broker_pb2.JoinGroupRequest, context: grpc.ServicerContext
    ) -> broker_pb2.BroadcastGroup:
        """A replica joins the broadcast group; the group carrying `version`, its rank, and (a member) the manifest."""
        run_id = check_run_id(request.run_id)
        failed = request.failed_epoch if request.HasField("failed_epoch") else None
        group, rank = self.groups.join(run_id, request.replica, request.version, failed, request.leave)
        answer = _group_pb(group, request.version, rank)
        if rank > 0:
            with self.store.open(run_id, request.version) as reader:
                manifest = reader.manifest
                answer.manifest.CopyFrom(weights_delta.full(manifest) if weights_delta.is_delta(manifest) else manifest)
        return answer

    def FormGroup(
        self, request: broker_pb2.FormGroupRequest, context: grpc.ServicerContext
    ) -> broker_pb2.BroadcastGroup:
        """The trainer: the group that takes `version` by broadcast (`cadence.broker.groups`)."""
        failed = request.failed_epoch if request.HasField("failed_epoch") else None
        run_id = check_run_id(request.run_id)
        group = self.groups.form(run_id, request.version, request.master_addr, request.backend, failed)
        return _group_pb(group, request.version, 0 if group.members else -1)

    def Status(self, request: broker_pb2.BrokerStatusRequest, context: grpc.ServicerContext) -> broker_pb2.BrokerStatus:
        stats = self.store.stats()
        return broker_pb2.BrokerStatus(
            versions=stats.versions,
            stored_bytes=stats.stored_bytes,
            active_fetches=stats.active_reads,
            watchers=stats.watchers,
            retain=stats.retain,
            bytes_out=self._bytes_out,
            relays=self.relays.count(),
            group_members=self.groups.count(),
        )

    def _admit_stream(self, method: str) -> None:
        """Streams hold a server thread each: refuse beyond `max_streams` rather than hang new calls."""
        stats = self.store.stats()
        if stats.watchers + stats.active_reads >= self.max_streams:
            raise Overloaded(
                f"{method} refused: {stats.watchers} watches and {stats.active_reads} fetches already hold the "
                f"broker's {self.max_streams} stream slots; retry shortly (clients back off) or add a broker",
                retry_after=1.0,
            )

    def close(self) -> None:
        """Drain: refuse new publishes and end every watch so the server can stop."""
        self.store.close()


def add_to_server(servicer: BrokerServicer, server: grpc.Server) -> None:
    """Like the generated `add_BrokerServicer_to_server`, but weight chunks use `cadence.weights_wire`'s
    one-copy framing (same bytes on the wire, so generated stubs interoperate)."""
    handlers = {
        "Publish": grpc.stream_unary_rpc_method_handler(
            servicer.Publish, request_deserializer=decode, response_serializer=_serialize
        ),
        "Latest": grpc.unary_unary_rpc_method_handler(
            servicer.Latest, request_deserializer=broker_pb2.LatestRequest.FromString, response_serializer=_serialize
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request_deserializer=broker_pb2.WatchRequest.FromString, response_serializer=_serialize
        ),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch, request_deserializer=broker_pb2.FetchRequest.FromString, response_serializer=encode
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=broker_pb2.BrokerStatusRequest.FromString,
            response_serializer=_serialize,
        ),
        "Route": grpc.unary_unary_rpc_method_handler(
            servicer.Route, request_deserializer=broker_pb2.RouteRequest.FromString, response_serializer=_serialize
        ),
        "JoinGroup": grpc.unary_unary_rpc_method_handler(
            servicer.JoinGroup,
            request_deserializer=broker_pb2.JoinGroupRequest.FromString,
            response_serializer=_serialize,
        ),
        "FormGroup": grpc.unary_unary_rpc_method_handler(
            servicer.FormGroup,
            request_deserializer=broker_pb2.FormGroupRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("cadence.v1.Broker", handlers),))


def _sends_delta(manifest: common_pb2.WeightManifest, request: broker_pb2.FetchRequest) -> bool:
    """A version stored as a delta goes as that delta to a fetcher holding exactly its base."""
    if not (weights_delta.is_delta(manifest) and request.HasField("base_version")):
        return False
    return (request.base_version, request.base_sha256) == (manifest.delta.base_version, manifest.delta.base_sha256)


def _group_pb(group: Group, version: int, rank: int) -> broker_pb2.BroadcastGroup:
    return broker_pb2.BroadcastGroup(
        epoch=group.epoch,
        members=group.members,
        master_addr=group.master_addr,
        backend=group.backend,
        version=version,
        rank=rank,
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
