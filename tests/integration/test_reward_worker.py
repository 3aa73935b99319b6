"""The reward queue worker against a real redis-server: nothing lost, nothing doubled, failures retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from cadence.net import free_port
from cadence.reward import metrics
from cadence.reward.scoring import Scorer
from cadence.reward.verifier import MathVerifier
from cadence.reward.worker import RewardWorker
from cadence.streams import GROUPS, StreamConsumer, StreamProducer, stream_key
from cadence.v1 import common_pb2

RUN = "reward-test"


@pytest.fixture(scope="module")
def scorer() -> Iterator[Scorer]:
    verifier = MathVerifier(processes=2, item_timeout=3.0)
    assert verifier.wait_ready()
    yield Scorer(verifier)
    verifier.close()


def rollout(n: int) -> common_pb2.Rollout:
    """Prompt n has answer n; its samples are right, wrong, and unanswered."""
    prompt = common_pb2.Prompt(run_id=RUN, prompt_id=f"p{n}", task="math", text=f"What is {n}?", reference=str(n))
    samples = [common_pb2.Sample(text=t) for t in (f" \\boxed{{{n}}}", f" \\boxed{{{n + 1}}}", " hmm")]
    return common_pb2.Rollout(prompt=prompt, samples=samples, policy_version=n % 3)


def produce(url: str, count: int) -> None:
    StreamProducer(redis.Redis.from_url(url), stream_key(RUN, "rollouts")).add_many([rollout(n) for n in range(count)])


def scored(url: str) -> list[common_pb2.ScoredRollout]:
    out = []
    for _, fields in redis.Redis.from_url(url).xrange(stream_key(RUN, "scored")):
        message = common_pb2.ScoredRollout()
        message.ParseFromString(fields[b"m"])
        out.append(message)
    return out


def wait_for(url: str, count: int, timeout: float = 60.0) -> list[common_pb2.ScoredRollout]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = scored(url)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"only {len(scored(url))} of {count} rollouts scored")


def check_exactly_once(found: list[common_pb2.ScoredRollout], count: int) -> None:
    ids = sorted(int(s.rollout.prompt.prompt_id[1:]) for s in found)
    assert ids == list(range(count)), "a rollout was lost or written twice"
    for item in found:
        assert [(s.reward, s.reason) for s in item.scores] == [(1.0, "correct"), (0.0, "incorrect"), (0.0, "no_answer")]
        assert item.scorer_version.startswith("math-verify-")
        assert item.rollout.policy_version == int(item.rollout.prompt.prompt_id[1:]) % 3


def run_in_thread(worker: RewardWorker) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_every_rollout_is_scored_once_and_acknowledged(redis_url: str, scorer: Scorer) -> None:
    produce(redis_url, 40)
    thread, stop = run_in_thread(RewardWorker(scorer, redis_url, RUN, batch=8, block_ms=100))
    check_exactly_once(wait_for(redis_url, 40), 40)
    stop.set()
    thread.join(10)
    pending = redis.Redis.from_url(redis_url).xpending(stream_key(RUN, "rollouts"), GROUPS["rollouts"])
    assert pending["pending"] == 0


def test_a_worker_dying_mid_batch_loses_and_doubles_nothing(redis_url: str, scorer: Scorer) -> None:
    produce(redis_url, 30)
    client = redis.Redis.from_url(redis_url)
    doomed = StreamConsumer(client, stream_key(RUN, "rollouts"), GROUPS["rollouts"], "doomed", common_pb2.Rollout)
    taken = doomed.read(10)  # the process "dies" here: read, never written, never acknowledged
    assert len(taken) == 10
    survivor = RewardWorker(scorer, redis_url, RUN, consumer="survivor", batch=8, reclaim_idle_ms=300, block_ms=100)
    thread, stop = run_in_thread(survivor)
    check_exactly_once(wait_for(redis_url, 30), 30)
    # The doomed consumer wakes up late and tries to deliver its copy: refused, nothing doubled.
    late = survivor._score(taken)
    outputs = [RewardWorker._scored(e.message, r, 0.0) for e, r in zip(taken, late, strict=True)]
    assert doomed.forward([e.id for e in taken], stream_key(RUN, "scored"), outputs) is False
    stop.set()
    thread.join(10)
    check_exactly_once(scored(redis_url), 30)


def test_a_failed_backend_is_retried_never_zeroed(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    produce(redis_url, 5)
    broken = MathVerifier(processes=1, item_timeout=3.0)
    broken.close()  # submitting to a closed pool fails, like a dead backend
    scorer = Scorer(broken)
    failures = metrics.WORKER_FAILURES._value.get()
    thread, stop = run_in_thread(RewardWorker(scorer, redis_url, RUN, batch=8, block_ms=100))
    time.sleep(1.5)
    assert scored(redis_url) == [], "a failing backend must not produce zero rewards"
    assert metrics.WORKER_FAILURES._value.get() >= failures + 2
    assert "scoring 5 rollouts failed, retrying" in caplog.text  # the outage is said, not hidden
    healthy = MathVerifier(processes=1, item_timeout=3.0)
    try:
        scorer.verifier = healthy  # the backend comes back
        check_exactly_once(wait_for(redis_url, 5), 5)
    finally:
        stop.set()
        thread.join(40)
        healthy.close()


def test_an_invalid_sample_is_scored_as_error_and_does_not_block(redis_url: str, scorer: Scorer) -> None:
    bad = rollout(7)
    bad.prompt.reference = ""
    StreamProducer(redis.Redis.from_url(redis_url), stream_key(RUN, "rollouts")).add_many([bad, rollout(8)])
    worker = RewardWorker(scorer, redis_url, RUN, batch=8, block_ms=100)
    assert worker.step() == 2
    first, second = scored(redis_url)
    assert [s.reason for s in first.scores] == ["error"] * 3
    assert [s.reason for s in second.scores] == ["correct", "incorrect", "no_answer"]


def test_a_slow_scoring_keeps_its_entries_from_other_workers(redis_url: str, scorer: Scorer) -> None:
    slow = rollout(0)
    slow.samples[2].text = "\\boxed{10^{10^{10}}}"  # math-verify works on it until the 3 s item timeout
    client = redis.Redis.from_url(redis_url)
    StreamProducer(client, stream_key(RUN, "rollouts")).add_many([slow, rollout(1)])
    worker = RewardWorker(scorer, redis_url, RUN, consumer="slow", batch=2, reclaim_idle_ms=300, block_ms=100)
    rival = StreamConsumer(
        client, stream_key(RUN, "rollouts"), GROUPS["rollouts"], "rival", common_pb2.Rollout, reclaim_idle_ms=300
    )
    written: list[int] = []
    thread = threading.Thread(target=lambda: written.append(worker.step()), daemon=True)
    thread.start()
    while client.xpending(stream_key(RUN, "rollouts"), GROUPS["rollouts"])["pending"] < 2:
        time.sleep(0.01)
    stolen, started = [], time.monotonic()
    while thread.is_alive():  # ten times the idle timeout: without the keep-alive the rival takes both
        stolen += rival.read(2)
        time.sleep(0.05)
    assert time.monotonic() - started > 1.0, "the scoring was not slow enough to test anything"
    assert stolen == [] and written == [2]
    found = scored(redis_url)
    assert sorted(s.rollout.prompt.prompt_id for s in found) == ["p0", "p1"]
    assert [s.reason for s in found[0].scores] == ["correct", "incorrect", "timeout"]


def start_serve(url: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """`cadence serve reward` as its own process, with the worker on; returns it and its HTTP port."""
    http_port = free_port()
    args = ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(free_port())]
    args += ["--redis-url", url, "--run-id", RUN, "--worker"]
    environment = {**os.environ, "CADENCE_POOL_PROCESSES": "1", **env}
    proc = subprocess.Popen([sys.executable, "-m", "cadence.app.cli", "serve", "reward", *args], env=environment)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200:
                return proc, http_port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("cadence serve reward did not become ready")


def test_serve_process_scores_the_stream_and_drains_on_sigterm(redis_url: str) -> None:
    proc, _ = start_serve(redis_url)
    try:
        produce(redis_url, 12)
        check_exactly_once(wait_for(redis_url, 12), 12)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_a_killed_serve_process_loses_and_doubles_nothing(redis_url: str, scorer: Scorer) -> None:
    proc, _ = start_serve(redis_url, CADENCE_ITEM_TIMEOUT_SECONDS="3", CADENCE_WORKER_BATCH="4")
    client = redis.Redis.from_url(redis_url)
    try:
        slow = rollout(0)
        slow.samples[2].text = "\\boxed{10^{10^{10}}}"  # keeps the batch busy for the 3 s deadline
        StreamProducer(client, stream_key(RUN, "rollouts")).add_many([slow] + [rollout(n) for n in range(1, 8)])
        deadline = time.monotonic() + 30
        while client.xpending(stream_key(RUN, "rollouts"), GROUPS["rollouts"])["pending"] == 0:
            assert time.monotonic() < deadline, "the serve process never took a batch"
            time.sleep(0.05)
        proc.kill()  # SIGKILL mid-batch
        proc.wait(10)
    finally:
        proc.kill()
    done_before = {s.rollout.prompt.prompt_id for s in scored(redis_url)}
    assert "p0" not in done_before
    thread, stop = run_in_thread(RewardWorker(scorer, redis_url, RUN, batch=8, reclaim_idle_ms=300, block_ms=100))
    found = wait_for(redis_url, 8)
    stop.set()
    thread.join(10)
    assert sorted(int(s.rollout.prompt.prompt_id[1:]) for s in found) == list(range(8))
    assert [s.reason for s in found[[s.rollout.prompt.prompt_id for s in found].index("p0")].scores][2] == "timeout"
