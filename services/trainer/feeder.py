"""The feeder: dataset → `prompts` stream under the cadence rule (DESIGN.md §2, `schedule.py`).

Each prompt is tagged with the step t that will consume it and the versions t accepts: `max_version` its
sync point s·⌊t/s⌋ (0 offline), `min_version` L blocks lower with `async_lag` L (= max_version when L is
0). A step is enqueued when the schedule says it is releasable: block k once version k·s is published and
never more than `max_inflight` steps ahead of the trainer; offline every step at once.

Which problems step t gets is a pure function of (seed, t), so a restarted trainer re-derives the same
batches; the position (`feeder_next_step`) is stored in the run's meta hash in the same Redis
transaction that enqueues a step's prompts, so it always agrees with the stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cadence import streams
from cadence.config import RunConfig
from cadence.logging import get_logger
from cadence.tasks import Problem
from cadence.trainer.schedule import Schedule, VersionWindow
from cadence.v1 import common_pb2

if TYPE_CHECKING:
    import redis

log = get_logger(__name__)
POSITION_FIELD = "feeder_next_step"


def step_quotas(weights: Sequence[float], batch: int, step: int) -> list[int]:
    """Prompts per task in one batch: proportional to `weights`, largest remainder, ties rotated by step."""
    total = sum(weights)
    exact = [batch * w / total for w in weights]
    quotas = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - quotas[i]), (i - step) % len(weights)))
    for i in order[: batch - sum(quotas)]:
        quotas[i] += 1
    return quotas


class PromptPlan:
    """The prompts of every step, derived from the tasks' problems and the seed alone."""

    def __init__(
        self,
        config: RunConfig,
        problems: Sequence[Sequence[Problem]],
        run_id: str,
        token_count: Callable[[Problem], int] | None = None,
    ) -> None:
        self.config, self.run_id = config, run_id
        self.schedule = Schedule.of(config)
        self.pools = [
            self._admissible(task.name, pool, token_count) for task, pool in zip(config.tasks, problems, strict=True)
        ]
        self.names = [task.name for task in config.tasks]
        self._orders: dict[tuple[int, int], list[int]] = {}
        self.weights = [task.weight for task in config.tasks]
        sampling = config.sampling
        self.sampling = common_pb2.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
        )

    def _admissible(
        self, name: str, pool: Sequence[Problem], token_count: Callable[[Problem], int] | None
    ) -> list[Problem]:
        """Refuse prompts longer than `model.max_prompt_tokens` (logged), keep the rest in order.
        `token_count` measures the prompt as the model gets it (`cadence.chat.prompt_token_ids`)."""
        limit = self.config.model.max_prompt_tokens
        kept = [p for p in pool if token_count is None or token_count(p) <= limit]
        if len(kept) < len(pool):
            log.warning("task %s: %d prompts longer than %d tokens refused", name, len(pool) - len(kept), limit)
        if not kept:
            raise ValueError(f"task {name!r} has no prompt within model.max_prompt_tokens={limit}; raise it")
        return kept

    def _problem(self, task: int, index: int) -> Problem:
        """The index-th problem of a task's stream: the pool reshuffled (seeded) every epoch."""
        pool = self.pools[task]
        epoch, offset = divmod(index, len(pool))
        return pool[self._order(task, epoch)[offset]]

    def _order(self, task: int, epoch: int) -> list[int]:
        """One epoch's seeded shuffle of a task's pool, kept while it is in use: a step draws a whole batch
        from it, and reshuffling 9,500 toy problems per prompt cost 70 ms per step — on the critical path
        after every weight sync, when the generator waits for the next block's prompts."""
        key = (task, epoch)
        if key not in self._orders:
            if len(self._orders) >= 2 * len(self.pools):
                self._orders.clear()
            order = list(range(len(self.pools[task])))
            random.Random(f"{self.config.seed}:{self.names[task]}:{epoch}").shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def prompts_for(self, step: int) -> list[common_pb2.Prompt]:
        """The `batch_prompts` prompts consumed at `step`, with their cadence tags."""
        batch = self.config.batch_prompts
        window = self.schedule.versions(step)
        prompts = []
        for task, quota in enumerate(step_quotas(self.weights, batch, step)):
            per_step = [step_quotas(self.weights, batch, t)[task] for t in range(step)] if quota else []
            first = sum(per_step)
            for j in range(quota):
                problem = self._problem(task, first + j)
                prompts.append(self._message(problem, step, window, len(prompts)))
        return prompts

    def _message(self, problem: Problem, step: int, window: VersionWindow, slot: int) -> common_pb2.Prompt:
        messages = [common_pb2.ChatMessage(**m) for m in problem.messages] if problem.messages else []
        return common_pb2.Prompt(
            run_id=self.run_id,
            prompt_id=f"t{step}.{slot}:{problem.prompt_id}",
            task=problem.kind,
            text=problem.text,
            messages=messages,
            reference=problem.reference or "",
            step=step,
            min_version=window.oldest,
            max_version=window.newest,
            sampling=self.sampling,
        )


class Feeder:
    """Enqueues the plan's prompts as the trainer advances and versions are published."""

    def __init__(self, client: redis.Redis, plan: PromptPlan) -> None:
        self.client, self.plan, self.schedule = client, plan, plan.schedule
        self.key = streams.stream_key(plan.run_id, "prompts")
        stored = streams.read_meta(client, plan.run_id).get(POSITION_FIELD)
        self.next_step = int(stored) if stored is not None else 0

    def top_up(self, trainer_step: int, version: int) -> int:
        """Enqueue every step that may be released now; returns how many steps were enqueued."""
        released = 0
        while self.schedule.releasable(self.next_step, trainer_step, version):
            self._enqueue(self.next_step)
            self.next_step += 1
            released += 1
        return released

    def _enqueue(self, step: int) -> None:
        prompts = self.plan.prompts_for(step)
        streams.add_with_meta(self.client, self.plan.run_id, "prompts", prompts, POSITION_FIELD, step + 1)
        log.debug("enqueued %d prompts for step %d", len(prompts), step)

    def requeue(self, prompt: common_pb2.Prompt) -> None:
        """Put a prompt back (its rollout broke the rule) so that a correct rollout replaces it."""
        streams.StreamProducer(self.client, self.key).add(prompt)
