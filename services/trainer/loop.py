"""The training loop (rank 0): scored rollouts → a step's batch → update → publish → metrics → checkpoint.

- A step's batch is `batch_prompts` prompts (the paper counts batches in prompts), read from `scored`.
- A rollout whose policy version breaks the cadence rule is rejected (logged, counted, its prompt
  re-enqueued), never trained on; (prompt_id, policy_version) duplicates and late copies are dropped.
- Weights go to the broker after every s steps; the loop does not wait for anyone to fetch them.
- Crash consistency: scored entries are acknowledged only once a checkpoint covering them is written,
  so a restarted trainer re-reads exactly the samples of the steps it lost and replays them; versions the
  broker already holds are never published again; metrics and ledger lines after the checkpoint are cut.
- Faults: an unreachable broker is waited out; a broker that restarted empty gets the newest version again;
  Redis losing the run's data (no persistence) stops the run with a message naming the fix.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from cadence import streams
from cadence.errors import CadenceRuleViolation, IntegrityError, InvalidRequest, NotReady
from cadence.logging import get_logger
from cadence.trainer.feeder import Feeder, allowed_versions
from cadence.trainer.update import Group, StepPlan, broadcast_plan, execute
from cadence.v1 import common_pb2

log = get_logger(__name__)

STEP = Gauge("cadence_trainer_step", "Optimizer steps done")
VERSION = Gauge("cadence_trainer_version", "Newest published policy version")
LOSS = Gauge("cadence_trainer_loss", "Loss of the last step")
REJECTED = Counter("cadence_trainer_rejected_rollouts_total", "Rollouts refused for breaking the cadence rule")
DUPLICATES = Counter("cadence_trainer_duplicate_rollouts_total", "Duplicate or late rollouts dropped")
STEP_SECONDS = Gauge("cadence_trainer_step_seconds", "Wall time of the last step", ["phase"])
DYNAMICS = Gauge("cadence_trainer_dynamics", "Training dynamics of the last step", ["metric"])
DYNAMICS_KEYS = ("reward_mean", "accuracy", "entropy", "length_mean", "staleness_mean", "staleness_max")
HIST_BINS = 10
META_MARK = "state"  # set when the run starts: its absence later means Redis lost the run's data
MAX_ATTEMPTS = 3
BROKER_PATIENCE_SECONDS = 600.0
"""How long a publish waits out an unreachable broker before the trainer gives up."""
BROKER_CHECK_SECONDS = 10.0
"""While waiting this long for a step's samples, check that the broker still holds our newest version."""
T = TypeVar("T")


@dataclass
class LoopState:
    """What `Status` reports."""

    step: int = 0
    version: int = 0
    state: str = "starting"
    metrics: dict[str, Any] = field(default_factory=dict)


class TrainLoop:
    """Drives training on rank 0; other ranks follow its plans (`update.follow`)."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        client: Any,
        feeder: Feeder,
        transport: Any,
        run_dir: Path,
        run_id: str,
        consumer_name: str = "trainer-0",
    ) -> None:
        self.engine, self.tokenizer, self.client, self.feeder = engine, tokenizer, client, feeder
        self.transport, self.run_dir, self.run_id = transport, Path(run_dir), run_id
        self.config = engine.config
        self.consumer = streams.StreamConsumer(
            client,
            streams.stream_key(run_id, "scored"),
            streams.GROUPS["scored"],
            consumer_name,
            common_pb2.ScoredRollout,
            reclaim_idle_ms=600_000,
        )
        self.status = LoopState()
        self.stop_requested = threading.Event()
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard = _tensorboard(self.run_dir)

    def request_stop(self, reason: str) -> None:
        """Checkpoint and stop after the step in progress (a step still waiting for samples is abandoned)."""
        log.info("stop requested: %s", reason)
        self.status.state = "stopping"
        self.stop_requested.set()

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> LoopState:
        """Train until `steps` are done or a stop is requested; returns the final state."""
        self._resume()
        if not self.stop_requested.is_set():
            self.status.state = "training"
        self._write_meta(first=True)
        while self.status.step < self.config.steps and not self.stop_requested.is_set():
            if not self._one_step():
                break
        self._finish()
        return self.status

    def _resume(self) -> None:
        saved = self.engine.load_checkpoint(self.run_dir / "checkpoints")
        if saved is not None:
            state = saved["cadence"]
            self.status.step, self.status.version = state["step"], state["version"]
            self.rejected, self.duplicates = state.get("rejected", 0), state.get("duplicates", 0)
        for name in ("metrics.jsonl", "ledger.jsonl"):
            _truncate_after(self.run_dir / name, self.status.step)

    def _one_step(self) -> bool:
        step = self.status.step
        started = time.monotonic()
        groups, entry_ids = self._collect(step)
        if groups is None:
            return False
        waited = time.monotonic() - started
        sync = self._sync_points(step + 1)
        plan = StepPlan(step, groups, sync["reference"], sync["old_policy"], gather=sync["publish"])
        broadcast_plan(plan, self.engine.world_size)
        metrics, state = execute(self.engine, self.tokenizer, plan, self.run_dir)
        computed = time.monotonic()
        if sync["publish"]:
            self._publish(state, step + 1)
        published = time.monotonic()
        self.unacked.extend(entry_ids)
        self.status.step = step + 1
        self._record(step, groups, metrics, waited, computed - started - waited, published - computed, started)
        if self.config.checkpoint_every and self.status.step % self.config.checkpoint_every == 0:
            self._checkpoint()
        return True

    def _sync_points(self, done: int) -> dict[str, bool]:
        """After `done` steps: publish every s; reference every `ref_sync_every`; GRPO's π_old at publishes."""
        s, ref_every = self.config.sync_every, self.config.resolved_ref_sync_every()
        publish = s is not None and done % s == 0
        return {
            "publish": publish,
            "reference": ref_every is not None and done % ref_every == 0,
            "old_policy": publish and self.engine.old_policy is not None,
        }

    def _finish(self) -> None:
        stopped = self.status.step < self.config.steps
        self.status.state = "stopping" if stopped else "training"
        self._checkpoint()
        if not stopped:
            self._run_plan(StepPlan(self.status.step, save_final=True))
        self._broadcast(StepPlan(self.status.step, stop=True))
        self.status.state = "stopped" if stopped else "done"
        self._write_meta()
        log.info("trainer %s after step %d (version %d)", self.status.state, self.status.step, self.status.version)

    def _broadcast(self, plan: StepPlan) -> None:
        broadcast_plan(plan, self.engine.world_size)

    def _run_plan(self, plan: StepPlan) -> None:
        self._broadcast(plan)
        execute(self.engine, self.tokenizer, plan, self.run_dir)

    def _checkpoint(self) -> None:
        state = {"step": self.status.step, "version": self.status.version}
        state |= {"rejected": self.rejected, "duplicates": self.duplicates}
        self._run_plan(StepPlan(self.status.step, checkpoint=state))
        self.consumer.ack(self.unacked)
        self.unacked = []

    def _publish(self, state: dict | None, version: int) -> None:
        """Upload `version` unless the broker already holds it (a replay after a restart)."""
        assert state is not None
        latest = self._broker(self.transport.latest, "read the broker's latest version")
        if latest is not None and latest.version >= version:
            log.warning(
                "version %d already published (broker has %d); not publishing it again", version, latest.version
            )
        else:
            self._broker(lambda: self.transport.publish(state, version), f"publish version {version}")
        self.status.version = version
        VERSION.set(version)

    def _broker(self, call: Callable[[], T], what: str) -> T:
        """A broker call that outlives a broker restart: `NotReady` (after the client's own retries) is
        retried with backoff for up to `BROKER_PATIENCE_SECONDS`, so a restarting broker never kills a run."""
        started, delay = time.monotonic(), 1.0
        while True:
            try:
                return call()
            except NotReady as error:
                if time.monotonic() - started > BROKER_PATIENCE_SECONDS or self.stop_requested.is_set():
                    raise
                log.warning("broker unavailable (%s) during: %s; retrying in %.0fs", error, what, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _republish_if_lost(self) -> None:
        """A broker restarted without a persistent store has lost our newest version, and workers that need it
        would wait forever: publish it again, if the weights still are that version (no step since)."""
        version = self.status.version
        if version == 0 or self.status.step != version:
            return
        latest = self._broker(self.transport.latest, "read the broker's latest version")
        if latest is not None and latest.version >= version:
            return
        log.warning("the broker lost version %d (it has %s); publishing it again", version, latest and latest.version)
        plan = StepPlan(self.status.step, gather=True)
        self._broadcast(plan)
        _, state = execute(self.engine, self.tokenizer, plan, self.run_dir)
        assert state is not None
        self._broker(lambda: self.transport.publish(state, version), f"publish version {version} again")

    # -- reading the scored stream ---------------------------------------------------------------------

    def _collect(self, step: int) -> tuple[list[Group] | None, list[str]]:
        """Block until step `step`'s batch is complete (or a stop): its groups and entry ids."""
        want = self.config.batch_prompts
        checked = time.monotonic()
        while len(self.buffer[step]) + len(self.given_up[step]) < want:
            if self.stop_requested.is_set():
                return None, []
            self._check_run_data()
            if time.monotonic() - checked > BROKER_CHECK_SECONDS:
                self._republish_if_lost()
                checked = time.monotonic()
            self.feeder.top_up(step, self.status.version)
            count = 100_000 if self.first_read else max(want, 16)
            self.first_read = False
            for entry in self.consumer.read(count):
                self._admit(entry, step)
        chosen = self.buffer.pop(step)
        return [group for _, group in chosen.values()], [entry_id for entry_id, _ in chosen.values()]

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
        lowest, highest = allowed_versions(self.config, step)
        version = scored.rollout.policy_version
        if not lowest <= version <= highest:
            allowed = f"{lowest}" if lowest == highest else f"{lowest}..{highest}"
            raise CadenceRuleViolation(
                f"generated by version {version} but step {step} accepts only version {allowed} "
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
        prompt_ids = list(rollout.prompt_token_ids) or self.tokenizer(rollout.prompt.text)["input_ids"]
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

    # -- records -----------------------------------------------------------------------------------------

    def _record(
        self, step: int, groups: list[Group], metrics: dict, wait: float, compute: float, publish: float, start: float
    ) -> None:
        rewards = [r for g in groups for r in g.rewards]
        math = [float(r >= 0.5) for g in groups if g.task == "math" for r in g.rewards]
        lengths = [len(c) for g in groups for c in g.completions]
        tokens = sum(len(g.prompt_ids) * len(g.completions) + sum(map(len, g.completions)) for g in groups)
        staleness = [step - g.version for g in groups]
        row = {
            "step": step,
            "version": self.status.version,
            **{k: metrics.get(k) for k in ("loss", "chosen_logps", "rejected_logps", "margin", "entropy")},
            "reward_mean": _mean(rewards),
            "accuracy": _mean(math),
            "length_mean": _mean(lengths),
            "length_hist": _histogram(lengths, self.config.sampling.max_tokens),
            "staleness_mean": _mean(staleness),
            "staleness_max": max(staleness, default=None),
            "pairs_kept": metrics.get("pairs_kept", 0),
            "pairs_skipped": metrics.get("pairs_skipped", 0),
            "rejected_rollouts": self.rejected,
            "duplicates": self.duplicates,
            "samples": len(rewards),
            "tokens_per_s": tokens / compute if compute > 0 else None,
            "time_wait": wait,
            "time_compute": compute,
            "time_publish": publish,
            "step_time": time.monotonic() - start,
            **self._stage_times(step),
            **{k: v for k, v in metrics.items() if k not in ("loss", "pairs_kept", "pairs_skipped")},
        }
        _append(self.run_dir / "metrics.jsonl", row)
        ledger = {
            "step": step,
            "prompt_ids": [g.prompt_id for g in groups],
            "policy_versions": [g.version for g in groups],
        }
        _append(self.run_dir / "ledger.jsonl", ledger | {"samples": len(rewards)})
        self.status.metrics = row
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)
        STEP.set(step + 1)
        LOSS.set(row["loss"] or 0.0)
        for phase in ("wait", "compute", "publish"):
            STEP_SECONDS.labels(phase).set(row[f"time_{phase}"])
        for key in DYNAMICS_KEYS:
            if isinstance(row.get(key), int | float):
                DYNAMICS.labels(key).set(row[key])
        self._write_meta()
        log.info(
            "step %d loss %.4f reward %s pairs %s/%s wait %.2fs compute %.2fs",
            step,
            row["loss"] or 0.0,
            row["reward_mean"],
            row["pairs_kept"],
            row["pairs_skipped"],
            wait,
            compute,
        )

    def _stage_times(self, step: int) -> dict[str, float]:
        """Generation and scoring seconds behind a step's rollouts. Every rollout of one engine (or scorer)
        call carries that call's duration and a call may serve two steps, so a step gets the call's seconds
        in proportion to its rollouts among those of the call seen so far."""
        calls = self.step_calls.pop(step, Tally())
        times = {"time_generation": 0.0, "time_scoring": 0.0}
        for call, count in calls.items():
            times[f"time_{call[0]}"] += call[2] * count / self.call_sizes[call]
        return times

    def _write_meta(self, first: bool = False) -> None:
        """Update the run's meta hash; after the first write, finding it gone means Redis lost the run."""
        fields = {"state": self.status.state, "step": self.status.step, "version": self.status.version}
        key = streams.meta_key(self.run_id)

        def call() -> bool:
            pipe = self.client.pipeline(transaction=True)
            pipe.hexists(key, META_MARK)
            pipe.hset(key, mapping=fields)
            return bool(pipe.execute()[0])

        if not streams.retrying(call, "write run meta") and not first:
            raise _data_lost(self.run_id)

    def _check_run_data(self) -> None:
        if not streams.retrying(lambda: self.client.hexists(streams.meta_key(self.run_id), META_MARK), "hexists"):
            raise _data_lost(self.run_id)


def _data_lost(run_id: str) -> IntegrityError:
    return IntegrityError(
        f"Redis lost run {run_id}'s data (its meta hash {streams.meta_key(run_id)} vanished: Redis restarted "
        "without persistence or was flushed); in-flight prompts and samples are gone, so the run cannot go on "
        "exactly once. Turn Redis persistence on (appendonly yes; the chart and `cadence run` do) and restart the run"
    )


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard writer in `<run_dir>/tensorboard` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _mean(values: list[float] | list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _histogram(lengths: list[int], max_len: int) -> list[int]:
    """Counts of completion lengths in `HIST_BINS` equal bins over [0, max_len]."""
    width = max(1, -(-(max_len + 1) // HIST_BINS))
    counts = [0] * HIST_BINS
    for length in lengths:
        counts[min(length // width, HIST_BINS - 1)] += 1
    return counts


def _append(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps ≥ `step` (written after the checkpoint a restart resumes from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    path.write_text("".join(line + "\n" for line in lines))
