"""Routes scoring items by task (`math` → verifier, `chat` → reward model), validates limits, bounds load.

The one core object every transport (HTTP, gRPC, the queue worker) calls. It never sees a transport:
bad input raises `cadence.errors.InvalidRequest` naming the item index and field; too much work in flight
raises `Overloaded` with a retry hint; a failed backend raises `ScorerUnavailable` (retry later).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cadence.errors import InvalidRequest, NotReady, Overloaded
from cadence.reward.verifier import SCORER_VERSION, Verdict
from cadence.v1 import reward_pb2

if TYPE_CHECKING:
    from cadence.reward.reward_model import RewardModel
    from cadence.reward.verifier import MathVerifier

TASKS = ("math", "chat")


class ScorerUnavailable(NotReady):
    """A scoring backend (verifier pool, reward model) failed; the request may succeed when retried."""


@dataclass(frozen=True)
class Item:
    """One thing to score. `reference` is the gold answer (required for `math`)."""

    prompt: str
    response: str
    reference: str = ""
    task: str = "math"

    @classmethod
    def from_pb(cls, pb: reward_pb2.ScoreItem) -> Item:
        return cls(prompt=pb.prompt, response=pb.response, reference=pb.reference, task=pb.task or "math")


@dataclass(frozen=True)
class Result:
    """An item's reward, why, and which scorer produced it."""

    reward: float
    reason: str
    task: str
    scorer_version: str

    def to_pb(self) -> reward_pb2.ScoreResult:
        return reward_pb2.ScoreResult(
            reward=self.reward, reason=self.reason, task=self.task, scorer_version=self.scorer_version
        )


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work may be in flight at once."""

    max_items: int = 1024
    max_prompt_chars: int = 65536
    max_response_chars: int = 65536
    max_reference_chars: int = 8192
    max_inflight_items: int = 4096
    retry_after_seconds: float = 1.0


class Admission:
    """Counts items in flight; refuses (or makes wait) work beyond `capacity`.

    A request larger than the whole capacity is still admitted when nothing else is in flight, so every
    valid request can eventually run.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self._cond = threading.Condition()

    def _fits(self, count: int) -> bool:
        return self.in_flight == 0 or self.in_flight + count <= self.capacity

    def acquire(self, count: int, *, wait: bool, retry_after: float) -> None:
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._fits(count))
            elif not self._fits(count):
                raise Overloaded(
                    f"{self.in_flight} items are being scored (capacity {self.capacity}); "
                    f"retry after {retry_after:g}s or send smaller batches",
                    retry_after=retry_after,
                )
            self.in_flight += count

    def release(self, count: int) -> None:
        with self._cond:
            self.in_flight -= count
            self._cond.notify_all()


def _check_text(index: int, field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidRequest(
            f"items[{index}].{field}: {len(value)} characters exceeds the limit of {limit}; shorten it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            f"items[{index}].{field}: not valid Unicode text (lone surrogate at {error.start}); send UTF-8"
        ) from None


class Scorer:
    """Scores batches that may mix tasks; thread-safe."""

    def __init__(
        self,
        verifier: MathVerifier | None,
        reward_model: RewardModel | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.verifier = verifier
        self.reward_model = reward_model
        self.limits = limits or Limits()
        self.admission = Admission(self.limits.max_inflight_items)

    @property
    def tasks(self) -> list[str]:
        """Tasks this instance can score."""
        return [task for task, on in (("math", self.verifier), ("chat", self.reward_model)) if on is not None]

    @property
    def ready(self) -> bool:
        """Every configured backend can take work."""
        return self.verifier is None or self.verifier.ready

    def validate(self, items: Sequence[Item]) -> None:
        """Raise `InvalidRequest` for the first item or field that breaks a limit or a rule."""
        limits = self.limits
        if not items:
            raise InvalidRequest("items: empty; send at least one item")
        if len(items) > limits.max_items:
            raise InvalidRequest(f"items: {len(items)} items exceeds the limit of {limits.max_items}; split the batch")
        for index, item in enumerate(items):
            self.validate_item(index, item)

    def validate_item(self, index: int, item: Item) -> None:
        limits = self.limits
        if item.task not in TASKS:
            raise InvalidRequest(f"items[{index}].task: unknown task {item.task!r}; use one of {', '.join(TASKS)}")
        if item.task not in self.tasks:
            raise InvalidRequest(
                f"items[{index}].task: this instance cannot score {item.task!r} (it serves {self.tasks}); "
                "start it with --reward-model for chat"
            )
        if item.task == "math" and not item.reference.strip():
            raise InvalidRequest(f"items[{index}].reference: required for task 'math' (the gold answer)")
        _check_text(index, "prompt", item.prompt, limits.max_prompt_chars)
        _check_text(index, "response", item.response, limits.max_response_chars)
        _check_text(index, "reference", item.reference, limits.max_reference_chars)

    def score(self, items: Sequence[Item], *, wait: bool = False) -> list[Result]:
        """Validate, admit (raise `Overloaded`, or block when `wait`), and score `items` in order."""
        self.validate(items)
        count = len(items)
        self.admission.acquire(count, wait=wait, retry_after=self.limits.retry_after_seconds)
        try:
            return self._score(items)
        finally:
            self.admission.release(count)

    def _score(self, items: Sequence[Item]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        math_futures = self._submit_math(items)
        chat = [index for index, item in enumerate(items) if item.task == "chat"]
        if chat:
            for index, result in zip(chat, self._score_chat([items[i] for i in chat]), strict=True):
                results[index] = result
        for index, future in math_futures:
            verdict: Verdict = future.result()
            results[index] = Result(verdict.reward, verdict.reason, "math", SCORER_VERSION)
        return [result for result in results if result is not None]

    def _submit_math(self, items: Sequence[Item]) -> list[tuple[int, Future[Verdict]]]:
        if self.verifier is None:
            return []
        try:
            return [
                (index, self.verifier.submit(item.response, item.reference))
                for index, item in enumerate(items)
                if item.task == "math"
            ]
        except RuntimeError as error:
            raise ScorerUnavailable(f"math verifier unavailable ({error}); retry shortly") from error

    def _score_chat(self, items: Sequence[Item]) -> list[Result]:
        assert self.reward_model is not None
        try:
            scores = self.reward_model.score([(item.prompt, item.response) for item in items])
        except Exception as error:
            raise ScorerUnavailable(
                f"reward model failed ({type(error).__name__}: {error}); retry, or send smaller batches"
            ) from error
        version = self.reward_model.version
        return [
            Result(score, "scored", "chat", version) if math.isfinite(score) else Result(0.0, "error", "chat", version)
            for score in scores
        ]
