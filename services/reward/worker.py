"""Queue worker: `rollouts` stream → score every sample → `ScoredRollout` on the `scored` stream.

Crash-safe per DESIGN.md §3: outputs are written and inputs acknowledged in one atomic step
(`StreamConsumer.forward`), so a worker that dies mid-batch leaves its entries pending for another
consumer to reclaim — nothing is lost and nothing is written twice. A failing backend (the verifier
pool or the reward model) is retried with backoff, logged and counted, and rewards are never silently
zeroed; meanwhile the batch's entries are kept claimed (`StreamConsumer.keep_alive`), so a slow scoring is not
reclaimed and scored again by another worker.
A sample that breaks a limit (say an over-long response) is scored 0 with reason `error` and logged,
so one bad rollout cannot block the stream.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from cadence.errors import InvalidRequest
from cadence.logging import get_logger
from cadence.retry import Backoff, Retry, keep_running, retry
from cadence.reward import metrics
from cadence.reward.scoring import Item, Result, Scorer
from cadence.streams import GROUPS, Entry, StreamConsumer, connect, stream_key
from cadence.v1 import common_pb2

log = get_logger(__name__)
STEP_BACKOFF = Backoff(1.0, factor=1.0)
"""After a failed step (Redis gone for minutes, a bug): 1 s, every time."""
SCORE_BACKOFF = Backoff(0.5, cap=30.0)
"""While the scoring backend fails: 0.5 s, doubling, at most 30 s."""


def prompt_text(prompt: common_pb2.Prompt) -> str:
    """The prompt as plain text: `text`, else the last user turn of `messages`."""
    if prompt.text:
        return prompt.text
    users = [message.content for message in prompt.messages if message.role == "user"]
    return users[-1] if users else ""


def rollout_items(rollout: common_pb2.Rollout) -> list[Item]:
    prompt = rollout.prompt
    text, task = prompt_text(prompt), prompt.task or "math"
    return [Item(text, sample.text, prompt.reference, task) for sample in rollout.samples]


class RewardWorker:
    """One consumer of the run's `rollouts` stream (group `reward`)."""

    def __init__(
        self,
        scorer: Scorer,
        redis_url: str,
        run_id: str,
        *,
        consumer: str | None = None,
        batch: int = 16,
        reclaim_idle_ms: int = 30_000,
        block_ms: int = 1_000,
    ) -> None:
        self.scorer = scorer
        self.batch = batch
        self.client = connect(redis_url)
        self.out_key = stream_key(run_id, "scored")
        self.consumer = StreamConsumer(
            self.client,
            stream_key(run_id, "rollouts"),
            GROUPS["rollouts"],
            consumer or f"{socket.gethostname()}-{os.getpid()}",
            common_pb2.Rollout,
            reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms,
        )

    def run(self, stop: threading.Event) -> None:
        """Score batches until `stop` is set; the batch in hand is finished (or left pending) first."""
        log.info("reward worker consuming %s as %s", self.consumer.key, self.consumer.consumer)

        def failed(_: BaseException, delay: float) -> None:  # Redis gone for minutes, a bug: keep the worker alive
            metrics.WORKER_FAILURES.inc()
            log.exception("reward worker step failed; retrying in %.0fs", delay)

        keep_running(lambda: self.step(stop), stop, Retry(STEP_BACKOFF), on_failure=failed)
        log.info("reward worker stopped")

    def step(self, stop: threading.Event | None = None) -> int:
        """Read, score and forward one batch; returns the rollouts forwarded."""
        entries = self.consumer.read(self.batch)
        if not entries:
            return 0
        started = time.perf_counter()
        with self.consumer.keep_alive(lambda: [entry.id for entry in entries]):
            scores = self._score_with_retry(entries, stop or threading.Event())
        if scores is None:
            return 0
        elapsed = time.perf_counter() - started
        outputs = [
            self._scored(entry.message, results, elapsed) for entry, results in zip(entries, scores, strict=True)
        ]
        if not self.consumer.forward([entry.id for entry in entries], self.out_key, outputs):
            return 0
        metrics.WORKER_ROLLOUTS.inc(len(entries))
        return len(entries)

    def _score_with_retry(self, entries: list[Entry], stop: threading.Event) -> list[list[Result]] | None:
        """Scores per rollout; None when stopped while the backend kept failing (entries stay pending)."""

        def failed(error: BaseException, delay: float) -> None:
            metrics.WORKER_FAILURES.inc()
            log.error("scoring %d rollouts failed, retrying in %.1fs: %s", len(entries), delay, error)

        try:
            return retry(
                lambda: self._score(entries), Retry(SCORE_BACKOFF), retry_on=Exception, on_retry=failed, stop=stop
            )
        except Exception:  # only when stopped: every failure is retried until then
            return None

    def _score(self, entries: list[Entry]) -> list[list[Result]]:
        per_rollout = [rollout_items(entry.message) for entry in entries]
        flat = [item for items in per_rollout for item in items]
        results: list[Result | None] = [None] * len(flat)
        valid: list[int] = []
        for index, item in enumerate(flat):
            try:
                self.scorer.validate_item(index, item)
                valid.append(index)
            except InvalidRequest as error:
                log.warning("sample scored as error: %s", error)
                results[index] = Result(0.0, "error", item.task, "invalid-input")
        step = self.scorer.limits.max_items
        for start in range(0, len(valid), step):
            chunk = valid[start : start + step]
            for index, result in zip(chunk, self.scorer.score([flat[i] for i in chunk], wait=True), strict=True):
                results[index] = result
        metrics.observe_items([result for result in results if result is not None])
        grouped, start = [], 0
        for items in per_rollout:
            grouped.append([result for result in results[start : start + len(items)] if result is not None])
            start += len(items)
        return grouped

    @staticmethod
    def _scored(rollout: common_pb2.Rollout, results: list[Result], seconds: float) -> common_pb2.ScoredRollout:
        versions = sorted({result.scorer_version for result in results})
        return common_pb2.ScoredRollout(
            rollout=rollout,
            scores=[common_pb2.Score(reward=result.reward, reason=result.reason) for result in results],
            scorer_version=",".join(versions),
            scoring_seconds=seconds,
        )
