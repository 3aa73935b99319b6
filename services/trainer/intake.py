"""The trainer's intake: scored rollouts from the `scored` stream → a step's batch of groups.

- A rollout whose policy version breaks the cadence rule is rejected (logged, counted, its prompt
  re-enqueued), never trained on; (prompt_id, policy_version) duplicates and late copies are dropped.
- Entries are acknowledged only when the loop checkpoints (`acknowledge`), so a restarted trainer
  re-reads exactly the samples of the steps it lost.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import defaultdict
from typing import Any

from prometheus_client import Counter

from cadence import streams
from cadence.config import RunConfig
from cadence.errors import CadenceRuleViolation, InvalidRequest
from cadence.logging import get_logger
from cadence.trainer.feeder import Feeder
from cadence.trainer.update import Group
from cadence.v1 import common_pb2

log = get_logger(__name__)

REJECTED = Counter("cadence_trainer_rejected_rollouts_total", "Rollouts refused for breaking the cadence rule")
DUPLICATES = Counter("cadence_trainer_duplicate_rollouts_total", "Duplicate or late rollouts dropped")
MAX_ATTEMPTS = 3


class Intake:
    """Reads the scored stream into per-step batches, admitting only rollouts the cadence rule allows."""

    def __init__(
        self, client: Any, config: RunConfig, tokenizer: Any, feeder: Feeder, run_id: str, consumer_name: str
    ) -> None:
        self.config, self.tokenizer, self.feeder = config, tokenizer, feeder
        self.schedule = feeder.schedule
        self.consumer = streams.StreamConsumer(
            client,
            streams.stream_key(run_id, "scored"),
            streams.GROUPS["scored"],
            consumer_name,
            common_pb2.ScoredRollout,
            reclaim_idle_ms=600_000,
        )
        self.buffer: dict[int, dict[str, tuple[str, Group]]] = defaultdict(dict)
        self.seen: set[str] = set()
        self.unacked: list[str] = []
        self.rejected = 0
        self.duplicates = 0
        self.attempts: dict[str, int] = defaultdict(int)
        self.given_up: dict[int, set[str]] = defaultdict(set)
        self.call_sizes: Tally[tuple[str, str, float]] = Tally()
        self.step_calls: dict[int, Tally[tuple[str, str, float]]] = defaultdict(Tally)
        """Rollouts per (stage, worker, seconds) engine/scorer call: in all, and per step."""
        self.first_read = True  # the first read takes every entry left pending by a previous process

    def restore(self, state: dict[str, Any]) -> None:
        """Carry on the reject and duplicate counts of the checkpoint a restart resumes from."""
        self.rejected, self.duplicates = state.get("rejected", 0), state.get("duplicates", 0)

    def counts(self) -> dict[str, int]:
        """The counts a checkpoint keeps."""
        return {"rejected": self.rejected, "duplicates": self.duplicates}

    def complete(self, step: int) -> bool:
        """Whether step `step` has every prompt of its batch (or has given up on some)."""
        return len(self.buffer[step]) + len(self.given_up[step]) >= self.config.batch_prompts

    def read(self, step: int) -> None:
        """Read one batch of entries (blocking briefly) and admit them while step `step` is being filled."""
        count = 100_000 if self.first_read else max(self.config.batch_prompts, 16)
        self.first_read = False
        for entry in self.consumer.read(count):
            self._admit(entry, step)

    def take(self, step: int) -> list[Group]:
        """Step `step`'s groups; their entries are acknowledged at the next checkpoint."""
        chosen = self.buffer.pop(step)
        self.unacked.extend(entry_id for entry_id, _ in chosen.values())
        return [group for _, group in chosen.values()]

    def acknowledge(self) -> None:
        """Acknowledge every entry a checkpoint now covers (trained, dropped or rejected)."""
        self.consumer.ack(self.unacked)
        self.unacked = []

    def stage_times(self, step: int) -> dict[str, float]:
        """Generation and scoring seconds behind a step's rollouts. Every rollout of one engine (or scorer)
        call carries that call's duration and a call may serve two steps, so a step gets the call's seconds
        in proportion to its rollouts among those of the call seen so far."""
        calls = self.step_calls.pop(step, Tally())
        times = {"time_generation": 0.0, "time_scoring": 0.0}
        for call, count in calls.items():
            times[f"time_{call[0]}"] += call[2] * count / self.call_sizes[call]
        return times

    def _admit(self, entry: streams.Entry, step: int) -> None:
        if entry.id in self.seen:
            return
        self.seen.add(entry.id)
        rollout = entry.message.rollout
        target, prompt_id = rollout.prompt.step, rollout.prompt.prompt_id
        if target < step or target >= self.config.steps or prompt_id in self.buffer[target]:
            self.duplicates += 1
            DUPLICATES.inc()
            self.unacked.append(entry.id)
            return
        try:
            self._check(entry.message, target)
            group = self._group(entry.message)
        except (CadenceRuleViolation, InvalidRequest) as error:
            self._reject(entry.id, rollout.prompt, error)
            return
        self.buffer[target][prompt_id] = (entry.id, group)
        for call in (("generation", rollout.worker_id, rollout.generation_seconds),
                     ("scoring", "", entry.message.scoring_seconds)):  # fmt: skip
            self.call_sizes[call] += 1
            self.step_calls[target][call] += 1

    def _reject(self, entry_id: str, prompt: common_pb2.Prompt, error: Exception) -> None:
        """Count and log a bad rollout; re-enqueue its prompt, up to `MAX_ATTEMPTS` times per prompt, after
        which the step goes on without it (a worker that keeps failing must not stall training)."""
        log.error("rejected rollout %s (entry %s): %s", prompt.prompt_id, entry_id, error)
        self.rejected += 1
        REJECTED.inc()
        self.unacked.append(entry_id)
        self.attempts[prompt.prompt_id] += 1
        if self.attempts[prompt.prompt_id] < MAX_ATTEMPTS:
            self.feeder.requeue(prompt)
        else:
            log.error("giving up on prompt %s after %d bad rollouts", prompt.prompt_id, MAX_ATTEMPTS)
            self.given_up[prompt.step].add(prompt.prompt_id)

    def _check(self, scored: common_pb2.ScoredRollout, step: int) -> None:
        accepted, version = self.schedule.versions(step), scored.rollout.policy_version
        if version not in accepted:
            raise CadenceRuleViolation(
                f"generated by version {version} but step {step} accepts only version {accepted} "
                "(the cadence rule); the inference worker must sync to the prompt's min_version first"
            )
        samples, scores = scored.rollout.samples, scored.scores
        if not samples or len(samples) != len(scores):
            raise InvalidRequest(f"{len(samples)} samples but {len(scores)} scores; the reward worker must score each")
        limit = self.config.sampling.max_tokens + 1
        if any(len(s.token_ids) > limit for s in samples):
            raise InvalidRequest(f"a sample is longer than sampling.max_tokens={limit - 1} tokens")

    def _group(self, scored: common_pb2.ScoredRollout) -> Group:
        rollout = scored.rollout
        if not rollout.prompt_token_ids:
            raise InvalidRequest(
                "the rollout carries no prompt_token_ids; the inference worker must send the ids it generated "
                "from (the trainer scores those, never a re-tokenized prompt text)"
            )
        prompt_ids = list(rollout.prompt_token_ids)
        completions = [
            list(s.token_ids) or self.tokenizer(s.text, add_special_tokens=False)["input_ids"] for s in rollout.samples
        ]
        return Group(
            prompt_id=rollout.prompt.prompt_id,
            task=rollout.prompt.task or "math",
            version=rollout.policy_version,
            prompt_ids=prompt_ids,
            completions=completions,
            rewards=[score.reward for score in scored.scores],
            behavior_logps=[list(s.logprobs) for s in rollout.samples],
        )
