"""The rollout worker: prompts stream → engine (synced per the cadence rule) → rollouts stream.

For every prompt the loaded policy version must be ≥ the prompt's `min_version` (DESIGN.md §2). Prompts
already allowed are generated first; for the rest the worker waits until the broker has a version that is
new enough. When the broker has a newer version that the prompts in hand allow (their `max_version`, the
step's sync point), the worker takes it before generating, so with `async_lag` > 0 samples are as fresh as
published weights allow, not always the oldest allowed. A sync fetches the newest version whole (every
chunk and the whole payload sha256-verified) and only then loads it, so a broken fetch never leaves
half-loaded weights. Outputs are written and inputs acknowledged in
one atomic step (`StreamConsumer.forward`), so a crash loses nothing and writes nothing twice.

A background thread follows the broker's `Watch` stream, so waiting for a version costs no polling, and a
second fetches each announced version ahead (`cadence.inference.prefetch`), so a sync at s = 1 finds it in
hand. Another
keeps the entries being worked on fresh in Redis (XCLAIM to ourselves), so a long generation is not
reclaimed by another worker; a dead worker's entries go idle and are reclaimed after `reclaim_idle_ms`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import suppress

import redis
from prometheus_client import Counter, Gauge, Histogram

from cadence.clients.broker import WeightTransport
from cadence.errors import CadenceError, CadenceRuleViolation, InvalidRequest
from cadence.inference.broadcast import BroadcastMember
from cadence.inference.engine import Engine, SamplingParams, prompt_input
from cadence.inference.prefetch import Prefetcher
from cadence.logging import get_logger
from cadence.retry import Backoff, Retry, keep_running
from cadence.streams import GROUPS, Entry, StreamConsumer, stream_key
from cadence.v1 import common_pb2

log = get_logger(__name__)

PROMPTS = Counter("cadence_inference_prompts", "Prompts taken off the stream", ["outcome"])
TOKENS = Counter("cadence_inference_generated_tokens", "Tokens generated for rollouts")
LOADED_VERSION = Gauge("cadence_inference_loaded_version", "Policy version of the loaded weights")
SYNC_SECONDS = Histogram("cadence_inference_sync_seconds", "Weight sync (fetch + load) duration")
GENERATE_SECONDS = Histogram("cadence_inference_generate_seconds", "Engine call duration per sampling group")

WORKER_BACKOFF = Backoff(1.0, cap=15.0)
"""After a failed step or broker watch: 1 s, doubling, at most 15 s."""


def default_worker_id() -> str:
    """`<host>-<pid>`: unique per process (a pod's hostname is its name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class VersionWatcher:
    """Follows the broker's `Watch` stream on a daemon thread; `wait_for(v)` blocks until a version ≥ v exists.
    `on_version(v)` is called as each new version is seen (the prefetcher's cue)."""

    def __init__(self, weights: WeightTransport, on_version: Callable[[int], None] | None = None) -> None:
        self.weights = weights
        self.on_version = on_version
        self._newest: common_pb2.VersionInfo | None = None
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._retry = Retry(WORKER_BACKOFF)
        self._thread = threading.Thread(target=self._follow, name="broker-watch", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        # this thread must outlive any failure (the client retried already)
        keep_running(self._watch, self._closed, self._retry, on_failure=self._watch_failed)

    def _watch(self) -> None:
        for info in self.weights.watch(self._newest.version if self._newest else -1):
            self._retry.succeeded()
            with self._cond:
                self._newest = info
                self._cond.notify_all()
            if self.on_version is not None:
                self.on_version(info.version)

    def _watch_failed(self, error: BaseException, delay: float) -> None:
        if not self._closed.is_set():
            log.warning("broker watch failed (%s); retrying in %.1fs", error, delay)

    def close(self) -> None:
        """Stop following (closing the transport ends the blocked watch call)."""
        self._closed.set()
        self.weights.close()

    def newest(self) -> int:
        """The newest published version seen so far; -1 before the first."""
        with self._cond:
            return self._newest.version if self._newest is not None else -1

    def wait_for(self, version: int, stop: threading.Event) -> common_pb2.VersionInfo | None:
        """The newest version once it is ≥ `version`; None if `stop` is set first."""
        with self._cond:
            while not stop.is_set():
                if self._newest is not None and self._newest.version >= version:
                    return self._newest
                self._cond.wait(0.5)
        return None


class RolloutWorker:
    """Consumes `prompts` (group `inference`) and writes one `Rollout` per prompt to `rollouts`."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        run_id: str,
        weights: WeightTransport,
        *,
        worker_id: str | None = None,
        batch_prompts: int = 32,
        reclaim_idle_ms: int = 30_000,
        block_ms: int = 1_000,
        broadcast: BroadcastMember | None = None,
    ) -> None:
        """`broadcast`: take versions by the trainer's broadcast when the broker's group carries them to this
        replica (`cadence.inference.broadcast`), else fetch them."""
        self.engine = engine
        self.weights = weights
        self.broadcast = broadcast
        self.worker_id = worker_id or default_worker_id()
        self.batch_prompts = batch_prompts
        self.prompts_key = stream_key(run_id, "prompts")
        self.rollouts_key = stream_key(run_id, "rollouts")
        self.consumer = StreamConsumer(
            client,
            self.prompts_key,
            GROUPS["prompts"],
            self.worker_id,
            common_pb2.Prompt,
            reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms,
        )
        # Versions are fetched as the watch announces them (`cadence.inference.prefetch`), unless broadcast.
        self.prefetch = Prefetcher(weights, engine.version)
        self.watcher = VersionWatcher(weights, on_version=None if broadcast is not None else self.prefetch.announce)
        if broadcast is not None:
            broadcast.join()
        self._held: list[Entry[common_pb2.Prompt]] = []
        self._pending = 0
        LOADED_VERSION.set(engine.version)

    def close(self) -> None:
        """Leave the broadcast group, stop watching the broker and release its connection."""
        if self.broadcast is not None:
            self.broadcast.leave()
        self.prefetch.close()
        self.watcher.close()

    def pending_prompts(self) -> int:
        """Prompts not yet acknowledged by the group (undelivered + in progress); the last known count
        while Redis is unreachable, so `Status` never hangs on an outage."""
        with suppress(redis.RedisError):
            self._pending = self.consumer.backlog()
        return self._pending

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; the batch in hand is finished first. Failures back off and retry."""
        log.info("rollout worker started", extra={"worker": self.worker_id, "stream": self.prompts_key})

        def failed(error: BaseException, delay: float) -> None:
            log.warning("worker step failed (%s: %s); retrying in %.1fs", type(error).__name__, error, delay)

        keep_running(
            lambda: self.step(stop),
            stop,
            Retry(WORKER_BACKOFF),
            retry_on=(CadenceError, redis.RedisError),
            on_failure=failed,
        )
        log.info("rollout worker stopped", extra={"worker": self.worker_id, "released": len(self._held)})

    def step(self, stop: threading.Event) -> int:
        """Take a batch (or keep the one a failure left in hand) and finish it; returns rollouts written."""
        if not self._held:
            self._held = self.consumer.read(self.batch_prompts)
            self._encode_ahead()
        written = 0
        with self.consumer.keep_alive(lambda: [entry.id for entry in self._held]):
            while self._held and not stop.is_set():
                newer = self._newer_allowed()
                if newer is not None:
                    self._sync(newer, stop)
                ready = [e for e in self._held if e.message.min_version <= self.engine.version]
                if not ready:
                    self._sync(min(e.message.min_version for e in self._held), stop)
                    continue
                written += self._generate(self._first_stale(ready))
        return written

    def _encode_ahead(self) -> None:
        """Render and tokenize the batch's prompts now (the engine keeps their ids): at s = 1 this runs while
        the version they need is still being fetched ahead, not after it is loaded (~7 ms for 32 toy prompts)."""
        for entry in self._held:
            with suppress(InvalidRequest):  # `_checked` reports it when the prompt comes up
                self.engine.encode(prompt_input(entry.message))

    def _newer_allowed(self) -> int | None:
        """A published version newer than the loaded one that every held prompt allows (`max_version` set and
        ≥ it), or None. Taking it as soon as it exists keeps `async_lag` staleness low: a worker still at v0
        would otherwise generate a whole later block at v0 after version s was published."""
        newest = self.watcher.newest()
        if newest <= self.engine.version:
            return None
        if all(e.message.HasField("max_version") and e.message.max_version >= newest for e in self._held):
            return newest
        return None

    def _first_stale(self, ready: list[Entry[common_pb2.Prompt]]) -> list[Entry[common_pb2.Prompt]]:
        """Of the ready prompts, those a newer published version would not be allowed for, when there are
        any: they go first, so the rest can then be generated after syncing to that version."""
        newest = self.watcher.newest()
        if newest <= self.engine.version:
            return ready
        capped = [e for e in ready if not e.message.HasField("max_version") or e.message.max_version < newest]
        return capped if 0 < len(capped) < len(ready) else ready

    def _sync(self, version: int, stop: threading.Event) -> None:
        """Load the newest published version once one is ≥ `version` (returns early when stopping)."""
        if self.engine.version < version:
            log.info("waiting for policy version %d (loaded: %d)", version, self.engine.version)
        info = self.watcher.wait_for(version, stop)
        if info is None:
            return
        started = time.perf_counter()
        if self.broadcast is not None and self.broadcast.take(info.version):  # received, checked and loaded
            fetched = started
        else:
            with self.prefetch.fetched(info.version) as tensors:  # whole and verified before the engine is touched
                fetched = time.perf_counter()
                self.engine.load_weights(tensors.items(), info.version)
        LOADED_VERSION.set(info.version)
        SYNC_SECONDS.observe(time.perf_counter() - started)
        log.info(
            "loaded policy version %d",
            info.version,
            extra={"fetch_s": round(fetched - started, 3), "load_s": round(time.perf_counter() - fetched, 3)},
        )

    def _generate(self, entries: list[Entry[common_pb2.Prompt]]) -> int:
        """Generate the entries, one engine call per sampling configuration; forward each group's rollouts."""
        groups: dict[SamplingParams, list[Entry[common_pb2.Prompt]]] = defaultdict(list)
        for entry in entries:
            params = self._checked(entry)
            if params is not None:
                groups[params].append(entry)
        written = 0
        for params, group in groups.items():
            generation = self.engine.generate([prompt_input(e.message) for e in group], params)
            GENERATE_SECONDS.observe(generation.seconds)
            needed = max(e.message.min_version for e in group)
            if generation.policy_version < needed:
                raise CadenceRuleViolation(
                    f"generated with version {generation.policy_version} but min_version is {needed}; "
                    "weights were replaced by an older version outside the worker"
                )
            rollouts = [
                common_pb2.Rollout(
                    prompt=entry.message,
                    samples=[sample.to_pb() for sample in completion.samples],
                    prompt_token_ids=completion.prompt_token_ids,
                    policy_version=generation.policy_version,
                    generation_seconds=generation.seconds,
                    worker_id=self.worker_id,
                )
                for entry, completion in zip(group, generation.completions, strict=True)
            ]
            if self.consumer.forward([e.id for e in group], self.rollouts_key, rollouts):
                written += len(rollouts)
                PROMPTS.labels(outcome="generated").inc(len(rollouts))
                TOKENS.inc(sum(len(s.token_ids) for c in generation.completions for s in c.samples))
            else:
                PROMPTS.labels(outcome="reclaimed").inc(len(rollouts))
            self._release(group)
        return written

    def _release(self, entries: list[Entry[common_pb2.Prompt]]) -> None:
        """Drop finished entries from the batch in hand (a retry after a failure redoes only the rest)."""
        done = {entry.id for entry in entries}
        self._held = [entry for entry in self._held if entry.id not in done]

    def _checked(self, entry: Entry[common_pb2.Prompt]) -> SamplingParams | None:
        """The prompt's sampling params, or None after moving an ungeneratable prompt to `<prompts>:dead`."""
        params = SamplingParams.from_pb(entry.message.sampling)
        try:
            params.validate()
            self.engine.prepare(prompt_input(entry.message), params)
        except InvalidRequest as error:
            dead = f"{self.prompts_key}:dead"
            log.error("prompt %s cannot be generated, moved to %s: %s", entry.message.prompt_id, dead, error)
            self.consumer.forward([entry.id], dead, [entry.message])
            PROMPTS.labels(outcome="rejected").inc()
            self._release([entry])
            return None
        return params
