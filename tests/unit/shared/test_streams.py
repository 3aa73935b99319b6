"""Redis Streams against a real redis-server: acks, reclaim after a consumer dies, restarts, bad entries."""

import subprocess
import sys
import textwrap
import time

import redis

from cadence import streams
from cadence.v1 import common_pb2


def prompts(n: int) -> list[common_pb2.Prompt]:
    return [common_pb2.Prompt(run_id="r", prompt_id=f"p{i}", text=f"What is {i}+1?") for i in range(n)]


def drain(consumer: streams.StreamConsumer, out_key: str, rounds: int = 20) -> int:
    """Forward every readable entry to `out_key` as a Rollout; return how many were forwarded."""
    done = 0
    for _ in range(rounds):
        entries = consumer.read(count=4)
        if not entries:
            break
        outputs = [common_pb2.Rollout(prompt=entry.message) for entry in entries]
        assert consumer.forward([e.id for e in entries], out_key, outputs)
        done += len(entries)
    return done


def output_ids(client: redis.Redis, key: str) -> list[str]:
    ids = []
    for _, fields in client.xrange(key):
        rollout = common_pb2.Rollout()
        rollout.ParseFromString(fields[streams.FIELD])
        ids.append(rollout.prompt.prompt_id)
    return ids


def test_keys_follow_the_design() -> None:
    assert streams.stream_key("run1", "prompts") == "cadence:{run1}:prompts"
    assert streams.meta_key("run1") == "cadence:{run1}:meta"


def test_produce_consume_forward(redis_url: str) -> None:
    client = streams.connect(redis_url)
    key, out = streams.stream_key("r", "prompts"), streams.stream_key("r", "rollouts")
    streams.StreamProducer(client, key).add_many(prompts(10))
    consumer = streams.StreamConsumer(client, key, "inference", "w1", common_pb2.Prompt, block_ms=50)
    assert consumer.lag() == 10
    assert drain(consumer, out) == 10
    assert sorted(output_ids(client, out)) == sorted(f"p{i}" for i in range(10))
    assert consumer.pending() == 0
    assert consumer.lag() == 0


def test_entries_of_a_killed_consumer_are_reclaimed_once(redis_url: str) -> None:
    """A consumer process reads 6 entries and is SIGKILLed before acking: another consumer takes them over."""
    client = streams.connect(redis_url)
    key, out = streams.stream_key("r", "prompts"), streams.stream_key("r", "rollouts")
    streams.StreamProducer(client, key).add_many(prompts(10))
    script = textwrap.dedent(
        f"""
        import os, signal
        from cadence import streams
        from cadence.v1 import common_pb2
        c = streams.StreamConsumer(streams.connect({redis_url!r}), {key!r}, "inference", "doomed", common_pb2.Prompt)
        assert len(c.read(count=6)) == 6
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    survivor = streams.StreamConsumer(
        client, key, "inference", "w2", common_pb2.Prompt, reclaim_idle_ms=200, block_ms=50
    )
    assert drain(survivor, out) == 4  # the undelivered ones, at once
    time.sleep(0.3)
    assert drain(survivor, out) == 6  # the dead consumer's, after the idle timeout
    assert sorted(output_ids(client, out)) == sorted(f"p{i}" for i in range(10))
    assert survivor.pending() == 0


def test_a_slow_consumer_cannot_write_a_duplicate(redis_url: str) -> None:
    client = streams.connect(redis_url)
    key, out = streams.stream_key("r", "prompts"), streams.stream_key("r", "rollouts")
    streams.StreamProducer(client, key).add_many(prompts(2))
    slow = streams.StreamConsumer(client, key, "inference", "slow", common_pb2.Prompt, block_ms=50)
    taken = slow.read(count=2)
    time.sleep(0.15)
    fast = streams.StreamConsumer(client, key, "inference", "fast", common_pb2.Prompt, reclaim_idle_ms=100, block_ms=50)
    assert drain(fast, out) == 2
    assert not slow.forward([e.id for e in taken], out, [common_pb2.Rollout(prompt=e.message) for e in taken])
    assert sorted(output_ids(client, out)) == ["p0", "p1"]


def test_a_restarted_consumer_gets_its_own_pending_entries_first(redis_url: str) -> None:
    client = streams.connect(redis_url)
    key = streams.stream_key("r", "prompts")
    streams.StreamProducer(client, key).add_many(prompts(3))
    first = streams.StreamConsumer(client, key, "inference", "w1", common_pb2.Prompt, block_ms=50)
    assert [e.message.prompt_id for e in first.read(count=2)] == ["p0", "p1"]
    again = streams.StreamConsumer(client, key, "inference", "w1", common_pb2.Prompt, block_ms=50)
    assert [e.message.prompt_id for e in again.read(count=5)] == ["p0", "p1"]
    assert [e.message.prompt_id for e in again.read(count=5)] == ["p2"]


def test_malformed_entries_are_dead_lettered_not_fatal(redis_url: str) -> None:
    client = streams.connect(redis_url)
    key = streams.stream_key("r", "prompts")
    client.xadd(key, {b"m": b"\xff\xff\xff garbage"})
    client.xadd(key, {b"other": b"x"})
    streams.StreamProducer(client, key).add(prompts(1)[0])
    consumer = streams.StreamConsumer(client, key, "inference", "w1", common_pb2.Prompt, block_ms=50)
    entries = consumer.read(count=10)
    assert [e.message.prompt_id for e in entries] == ["p0"]
    assert client.xlen(f"{key}:dead") == 2
    assert consumer.pending() == 1


def test_redis_restart_mid_stream_loses_nothing(private_redis) -> None:
    """With AOF on, a Redis restart between reads is survived by reconnecting; every entry arrives once."""
    client = streams.connect(private_redis.url)
    key, out = streams.stream_key("r", "prompts"), streams.stream_key("r", "rollouts")
    producer = streams.StreamProducer(client, key)
    producer.add_many(prompts(10)[:5])
    consumer = streams.StreamConsumer(client, key, "inference", "w1", common_pb2.Prompt, block_ms=50)
    assert drain(consumer, out) == 5
    private_redis.restart()
    producer.add_many(prompts(10)[5:])
    assert drain(consumer, out) == 5
    assert sorted(output_ids(client, out)) == sorted(f"p{i}" for i in range(10))


def test_redis_down_then_back_is_waited_for(private_redis) -> None:
    client = streams.connect(private_redis.url)
    key = streams.stream_key("r", "prompts")
    producer = streams.StreamProducer(client, key)
    private_redis.kill()
    import threading

    threading.Timer(1.0, private_redis.start).start()
    started = time.monotonic()
    producer.add(prompts(1)[0])
    assert time.monotonic() - started >= 0.9
    assert producer.length() == 1


def test_run_meta_round_trip(redis_url: str) -> None:
    client = streams.connect(redis_url)
    streams.write_meta(client, "r", {"state": "training", "step": 3})
    assert streams.read_meta(client, "r") == {"state": "training", "step": "3"}


def test_a_batch_and_its_meta_update_land_together(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ids = streams.add_with_meta(client, "batch", "prompts", prompts(3), "position", 3)
    assert len(ids) == 3 and client.xlen(streams.stream_key("batch", "prompts")) == 3
    assert streams.read_meta(client, "batch") == {"position": "3"}
    assert streams.add_with_meta(client, "batch", "prompts", prompts(3), "position", 3) == []  # already there
    assert client.xlen(streams.stream_key("batch", "prompts")) == 3


def test_meta_checks_tell_when_redis_lost_the_run(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert not streams.meta_has(client, "lost", "state")
    assert streams.update_meta(client, "lost", {"state": "running", "step": 0}, mark="state") is False
    assert streams.update_meta(client, "lost", {"state": "running", "step": 1}, mark="state") is True
    assert streams.meta_has(client, "lost", "state")
    client.delete(streams.meta_key("lost"))  # Redis restarted empty
    assert not streams.meta_has(client, "lost", "state")
    assert streams.update_meta(client, "lost", {"step": 2}, mark="state") is False


def test_backlog_counts_undelivered_and_in_progress(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = streams.stream_key("backlog", "prompts")
    consumer = streams.StreamConsumer(client, key, "inference", "c1", common_pb2.Prompt, block_ms=10)
    streams.StreamProducer(client, key).add_many(prompts(5))
    taken = consumer.read(2)
    assert (consumer.backlog(), consumer.lag(), consumer.pending()) == (5, 3, 2)
    consumer.ack([e.id for e in taken])
    assert consumer.backlog() == 3


def test_keep_alive_keeps_a_slow_consumers_entries(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = streams.stream_key("alive", "prompts")
    slow = streams.StreamConsumer(client, key, "inference", "slow", common_pb2.Prompt, reclaim_idle_ms=300)
    rival = streams.StreamConsumer(client, key, "inference", "rival", common_pb2.Prompt, reclaim_idle_ms=300)
    streams.StreamProducer(client, key).add_many(prompts(2))
    held = slow.read(2)
    with slow.keep_alive(lambda: [entry.id for entry in held]):
        deadline = time.monotonic() + 1.5  # five idle timeouts
        while time.monotonic() < deadline:
            assert rival.read(2) == []
            time.sleep(0.05)
    assert slow.forward([e.id for e in held], streams.stream_key("alive", "rollouts"), [])
    streams.StreamProducer(client, key).add_many(prompts(1))
    taken = slow.read(1)
    time.sleep(0.4)  # no keep-alive: idle past the timeout, so another consumer takes it over
    assert [e.id for e in rival.read(1)] == [e.id for e in taken]


def test_trim_removes_only_what_every_group_acknowledged(redis_url: str) -> None:
    """Two groups on one stream: an entry goes once both acknowledged it; pending or undelivered entries
    stay, and the archive sees exactly the trimmed ones first."""
    client = redis.Redis.from_url(redis_url)
    key = streams.stream_key("trim", "prompts")
    assert streams.trim_finished(client, key) == 0  # no stream, no groups: nothing is known to be done
    first = streams.StreamConsumer(client, key, "inference", "a", common_pb2.Prompt, block_ms=10)
    second = streams.StreamConsumer(client, key, "audit", "b", common_pb2.Prompt, block_ms=10)
    ids = streams.StreamProducer(client, key).add_many(prompts(6))
    first.ack([e.id for e in first.read(4)])  # 0-3 done by the first group, 4-5 not delivered to it
    taken = second.read(3)
    second.ack([taken[0].id, taken[2].id])  # 0 and 2 done, 1 pending in the second group
    archived: list[str] = []
    assert streams.trim_finished(client, key, lambda found: archived.extend(i for i, _ in found)) == 1
    assert archived == ids[:1] and [i.decode() for i, _ in client.xrange(key)] == ids[1:]
    second.ack([taken[1].id])
    second.ack([e.id for e in second.read(3)])
    assert streams.trim_finished(client, key) == 3  # 1-3: the first group still has 4 and 5 to read
    assert [i.decode() for i, _ in client.xrange(key)] == ids[4:]
    first.ack([e.id for e in first.read(2)])
    assert streams.trim_finished(client, key) == 2 and client.xlen(key) == 0
    assert first.lag() == 0 and first.pending() == 0
