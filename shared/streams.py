"""Redis Streams for the data plane: protobuf messages in, protobuf messages out, nothing lost, nothing doubled.

Keys are `cadence:{<run_id>}:<kind>`; the braces are a Redis Cluster hash tag, so one run's keys share a slot
and the atomic forward script below works on a cluster too. Each entry holds one serialized message in field
`m`. Delivery is at-least-once: entries stay pending until acknowledged; a dead consumer's are reclaimed
(XAUTOCLAIM) after an idle timeout. `forward` writes a stage's outputs and acknowledges its inputs in one
script that first checks the consumer still owns them, so a reclaimed slow consumer cannot write a duplicate.
Entries every group acknowledged are trimmed (`trim_finished`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import redis
from google.protobuf.message import DecodeError, Message

from cadence.errors import NotReady
from cadence.logging import get_logger
from cadence.retry import Backoff, Retry, retry

log = get_logger(__name__)

Kind = Literal["prompts", "rollouts", "scored"]
GROUPS: dict[str, str] = {"prompts": "inference", "rollouts": "reward", "scored": "trainer"}
FIELD = b"m"
M = TypeVar("M", bound=Message)
T = TypeVar("T")

_FORWARD_LUA = """
local n_ids = tonumber(ARGV[3])
for i = 1, n_ids do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3 + i], ARGV[3 + i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then return -1 end
end
for j = 4 + n_ids, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'm', ARGV[j])
end
if n_ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4, 3 + n_ids))
end
return n_ids
"""

_ADD_WITH_POSITION_LUA = """
local stored = redis.call('HGET', KEYS[2], ARGV[1])
if stored and tonumber(stored) >= tonumber(ARGV[2]) then return {} end
local ids = {}
for i = 3, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'm', ARGV[i])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return ids
"""


def stream_key(run_id: str, kind: Kind) -> str:
    """`cadence:{run_id}:prompts|rollouts|scored`."""
    if kind not in GROUPS:
        raise ValueError(f"unknown stream kind {kind!r}; use one of {sorted(GROUPS)}")
    return f"cadence:{{{run_id}}}:{kind}"


def meta_key(run_id: str) -> str:
    """The run's metadata hash (config, state, latest step)."""
    return f"cadence:{{{run_id}}}:meta"


def run_keys(run_id: str) -> list[str]:
    """Every key a run owns (to delete a finished run's data)."""
    return [*(stream_key(run_id, kind) for kind in GROUPS), meta_key(run_id), f"{stream_key(run_id, 'prompts')}:dead"]


def connect(url: str) -> redis.Redis:
    """A client that notices a dead connection quickly; callers wrap calls in `retrying`."""
    return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_keepalive=True, health_check_interval=10)


REDIS_BACKOFF = Backoff(0.1, cap=5.0)


def retrying(call: Callable[[], T], what: str, give_up_after: float = 600.0) -> T:
    """Run `call`, reconnecting with exponential backoff while Redis is unreachable or loading.

    Logs once per outage and once on recovery; after `give_up_after` seconds raises `NotReady`.
    """
    loop = Retry(REDIS_BACKOFF, patience=give_up_after)

    def warn_once(error: BaseException, _: float) -> None:
        if loop.failures == 1:
            log.warning("Redis unavailable during %s, retrying with backoff: %s", what, error)

    try:
        result = retry(call, loop, retry_on=(redis.ConnectionError, redis.TimeoutError), on_retry=warn_once)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise NotReady(
            f"Redis unreachable for {loop.elapsed:.0f}s during {what}: {error}; check CADENCE_REDIS_URL "
            "and that redis-server is running"
        ) from error
    if loop.failures:
        log.info("Redis reachable again (%s) after %.1fs", what, loop.elapsed)
    return result


def write_meta(client: redis.Redis, run_id: str, fields: dict[str, str | int | float]) -> None:
    retrying(lambda: client.hset(meta_key(run_id), mapping=fields), "write run meta")


def read_meta(client: redis.Redis, run_id: str) -> dict[str, str]:
    raw = retrying(lambda: client.hgetall(meta_key(run_id)), "read run meta")
    return {k.decode(): v.decode() for k, v in raw.items()}


def update_meta(client: redis.Redis, run_id: str, fields: dict[str, str | int | float], mark: str) -> bool:
    """Write `fields` to the run's meta hash; returns whether `mark` was there before (in the same transaction),
    so a caller that set `mark` earlier can tell that Redis lost the run's data."""

    def call() -> bool:
        pipe = client.pipeline(transaction=True)
        pipe.hexists(meta_key(run_id), mark)
        pipe.hset(meta_key(run_id), mapping=fields)
        return bool(pipe.execute()[0])

    return retrying(call, "write run meta")


def meta_has(client: redis.Redis, run_id: str, field: str) -> bool:
    """Whether the run's meta hash holds `field`."""
    return bool(retrying(lambda: client.hexists(meta_key(run_id), field), "hexists"))


def add_with_meta(
    client: redis.Redis, run_id: str, kind: Kind, messages: Sequence[Message], position_field: str, position: int
) -> list[str]:
    """Append `messages` to the run's `kind` stream and set `position_field` of its meta hash to `position`, in
    one script, so the position never disagrees with what the stream holds. Nothing is written (returns [])
    when the stored position is already `position` or past it: a call retried after a lost reply — Redis ran
    it, then the connection dropped before the answer came back — appends nothing twice."""
    args = [position_field, position, *(message.SerializeToString() for message in messages)]
    script = client.register_script(_ADD_WITH_POSITION_LUA)
    keys = [stream_key(run_id, kind), meta_key(run_id)]
    ids = retrying(lambda: script(keys=keys, args=args), f"xadd {kind} batch with meta")
    return [entry_id.decode() for entry_id in ids]


def memory(client: redis.Redis) -> tuple[int, int]:
    """Redis's `used_memory` and `maxmemory` (0: no limit), in bytes."""
    info = retrying(lambda: client.info("memory"), "info memory")
    return int(info["used_memory"]), int(info.get("maxmemory") or 0)


def trim_finished(
    client: redis.Redis, key: str, archive: Callable[[list[tuple[str, dict]]], None] | None = None
) -> int:
    """Delete the entries of `key` every consumer group was given and acknowledged (XTRIM MINID), so a long
    run's streams hold only the work in flight; returns how many went. `archive` first gets those (id, fields)
    (a crash in between hands them to the next call again). A stream without groups is left alone."""
    if (threshold := _finished_below(client, key)) is None:
        return 0
    if archive is not None:
        if not (entries := retrying(lambda: client.xrange(key, "-", f"({threshold}"), "xrange finished")):
            return 0
        archive([(raw_id.decode(), fields) for raw_id, fields in entries])
    return int(retrying(lambda: client.xtrim(key, minid=threshold, approximate=False), "xtrim"))


def _finished_below(client: redis.Redis, key: str) -> str | None:
    """The smallest entry id a group still needs (its oldest pending one, else the one after its last delivered
    one): every group acknowledged every entry below it. None: no groups (or no stream)."""
    try:
        if not (groups := retrying(lambda: client.xinfo_groups(key), "xinfo groups")):
            return None
    except redis.ResponseError:  # no such stream
        return None
    needed = []
    for group in groups:
        pending = retrying(lambda name=group["name"]: client.xpending(key, name), "xpending")
        ms, seq = _entry_id(pending["min"] if pending["pending"] else group["last-delivered-id"])
        needed.append((ms, seq if pending["pending"] else seq + 1))
    return "-".join(map(str, min(needed)))


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    ms, seq = (raw.decode() if isinstance(raw, bytes) else raw).split("-")
    return int(ms), int(seq)


class StreamProducer:
    """Appends protobuf messages to one stream."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key

    def add(self, message: Message) -> str:
        entry_id = retrying(lambda: self.client.xadd(self.key, {FIELD: message.SerializeToString()}), "xadd")
        return entry_id.decode()

    def add_many(self, messages: Sequence[Message]) -> list[str]:
        def call() -> list[bytes]:
            pipe = self.client.pipeline(transaction=True)
            for message in messages:
                pipe.xadd(self.key, {FIELD: message.SerializeToString()})
            return pipe.execute()

        return [entry_id.decode() for entry_id in retrying(call, "xadd batch")]

    def length(self) -> int:
        return int(retrying(lambda: self.client.xlen(self.key), "xlen"))


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One delivered stream entry and its decoded message."""

    id: str
    message: M


class StreamConsumer(Generic[M]):
    """One member of a consumer group reading protobuf messages of one type."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        group: str,
        consumer: str,
        message_type: type[M],
        *,
        reclaim_idle_ms: int = 30_000,
        block_ms: int = 1_000,
    ) -> None:
        self.client, self.key, self.group, self.consumer = client, key, group, consumer
        self.message_type = message_type
        self.reclaim_idle_ms, self.block_ms = reclaim_idle_ms, block_ms
        self._forward = client.register_script(_FORWARD_LUA)
        self._own_pending_checked = False
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; from the start, so nothing enqueued earlier is missed."""

        def call() -> None:
            try:
                self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

        retrying(call, "create consumer group")

    def read(self, count: int = 1) -> list[Entry[M]]:
        """Up to `count` entries: this consumer's own unacknowledged ones after a restart, then entries
        reclaimed from dead consumers, then new ones (blocking up to `block_ms`)."""
        if not self._own_pending_checked:
            self._own_pending_checked = True
            own = self._xreadgroup("0", count, block=False)
            if own:
                return own
        reclaimed = self._reclaim(count)
        if reclaimed:
            return reclaimed
        return self._xreadgroup(">", count, block=True)

    def _xreadgroup(self, start: str, count: int, block: bool) -> list[Entry[M]]:
        def call() -> list:
            return self.client.xreadgroup(
                self.group, self.consumer, {self.key: start}, count=count, block=self.block_ms if block else None
            )

        reply = self._with_group(call, "xreadgroup")
        entries = reply[0][1] if reply else []
        return self._decode(entries)

    def _reclaim(self, count: int) -> list[Entry[M]]:
        def call() -> list:
            return self.client.xautoclaim(
                self.key, self.group, self.consumer, min_idle_time=self.reclaim_idle_ms, start_id="0-0", count=count
            )

        reply = self._with_group(call, "xautoclaim")
        entries = reply[1] if reply else []
        if entries:
            log.info("reclaimed %d entries abandoned on %s", len(entries), self.key)
        return self._decode(entries)

    def _with_group(self, call: Callable[[], T], what: str) -> T:
        """Redis restarted without persistence loses groups: recreate ours and try again."""
        try:
            return retrying(call, what)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning("consumer group %s on %s vanished (Redis restarted without persistence?)", self.group, self.key)
            self.ensure_group()
            return retrying(call, what)

    def _decode(self, entries: list) -> list[Entry[M]]:
        decoded: list[Entry[M]] = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if fields is None:  # deleted from the stream while pending
                continue
            message = self.message_type()
            try:
                message.ParseFromString(fields[FIELD])
            except (KeyError, DecodeError) as error:
                self._dead_letter(entry_id, fields, f"undecodable {self.message_type.__name__}: {error!r}")
                continue
            decoded.append(Entry(entry_id, message))
        return decoded

    def _dead_letter(self, entry_id: str, fields: dict, reason: str) -> None:
        """Move a malformed entry aside (`<key>:dead`) so it is kept for inspection but never blocks the stage."""
        log.error("malformed entry %s on %s moved to %s:dead: %s", entry_id, self.key, self.key, reason)

        def call() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(f"{self.key}:dead", {**fields, b"reason": reason.encode(), b"source_id": entry_id.encode()})
            pipe.xack(self.key, self.group, entry_id)
            pipe.execute()

        retrying(call, "dead-letter")

    def ack(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(retrying(lambda: self.client.xack(self.key, self.group, *entry_ids), "xack"))

    def forward(self, entry_ids: Sequence[str], out_key: str, messages: Sequence[Message]) -> bool:
        """Write `messages` to `out_key` and acknowledge `entry_ids`, atomically.

        Returns False (writing nothing) when another consumer has reclaimed any of the entries meanwhile:
        that consumer now owns them and will write their output.
        """
        args = [self.group, self.consumer, len(entry_ids), *entry_ids]
        args += [message.SerializeToString() for message in messages]
        result = retrying(lambda: self._forward(keys=[self.key, out_key], args=args), "forward")
        if int(result) < 0:
            log.warning("entries %s were reclaimed by another consumer; dropping this copy", list(entry_ids))
            return False
        return True

    def lag(self) -> int:
        """Entries in the stream not yet delivered to this group."""
        info = self._group_info(self._with_group(lambda: self.client.xinfo_groups(self.key), "xinfo groups"))
        return int(info.get("lag") or 0)

    def pending(self) -> int:
        """Entries delivered to the group but not yet acknowledged."""
        summary = self._with_group(lambda: self.client.xpending(self.key, self.group), "xpending")
        return int(summary["pending"])

    def backlog(self) -> int:
        """Entries the group has not acknowledged yet (undelivered + in progress), in one call and without
        retrying: raises `redis.RedisError` while Redis is unreachable, so a status probe never hangs."""
        info = self._group_info(self.client.xinfo_groups(self.key))
        return int(info.get("lag") or 0) + int(info.get("pending") or 0)

    def _group_info(self, groups: list[dict]) -> dict:
        for info in groups:
            if info["name"] in (self.group, self.group.encode()):
                return info
        return {}

    @contextmanager
    def keep_alive(self, entry_ids: Callable[[], Sequence[str]]) -> Iterator[None]:
        """While the block runs, re-claim the entries `entry_ids()` names to this consumer every third of
        `reclaim_idle_ms`, so a slow stage keeps them; only a dead consumer's entries go idle and are reclaimed."""
        done = threading.Event()
        interval = self.reclaim_idle_ms / 3000

        def touch() -> None:
            while not done.wait(interval):
                ids = list(entry_ids())
                if not ids:
                    continue
                try:
                    self.client.xclaim(
                        self.key,
                        self.group,
                        self.consumer,
                        min_idle_time=int(interval * 1000),
                        message_ids=ids,
                        justid=True,
                    )
                except redis.RedisError as error:  # the stage's own calls report outages; this only delays reclaim
                    log.debug("keep-alive failed: %s", error)

        thread = threading.Thread(target=touch, name="keep-alive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
