"""The training loop (rank 0): scored rollouts → a step's batch → update → publish → metrics → checkpoint.

- A step's batch is `batch_prompts` prompts (the paper counts batches in prompts), read from `scored`
  by the intake (`intake.py`: the cadence rule's admission, rejects, duplicates).
- Weights go to the broker at the schedule's publish points, every s steps (`schedule.py`, `publishing.py`); the
  reference and GRPO's π_old move at its sync points. The loop does not wait for anyone to fetch the weights,
  and the prompts they allow go out at once, before the step's records and checkpoint (at s = 1 the
  generator has nothing else to do).
- Crash consistency: scored entries are acknowledged only once a checkpoint covering them is written (and
  then every stream's finished entries are trimmed, `retention.py`),
  so a restarted trainer re-reads exactly the samples of the steps it lost and replays them; versions the
  broker already holds are never published again; metrics and ledger lines after the checkpoint are cut.
- Faults: an unreachable broker is waited out; a broker that restarted empty gets the newest version again;
  Redis losing the run's data (no persistence) stops the run with a message naming the fix.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from cadence import streams
from cadence.errors import IntegrityError
from cadence.logging import get_logger
from cadence.trainer.feeder import Feeder
from cadence.trainer.intake import Intake
from cadence.trainer.publishing import Publisher
from cadence.trainer.resume import mark_finished, prune_checkpoints
from cadence.trainer.retention import StreamRetention
from cadence.trainer.update import Group, StepPlan, broadcast_plan, execute

log = get_logger(__name__)

STEP = Gauge("cadence_trainer_step", "Optimizer steps done")
VERSION = Gauge("cadence_trainer_version", "Newest published policy version")
LOSS = Gauge("cadence_trainer_loss", "Loss of the last step")
STEP_SECONDS = Gauge("cadence_trainer_step_seconds", "Wall time of the last step", ["phase"])
DYNAMICS = Gauge("cadence_trainer_dynamics", "Training dynamics of the last step", ["metric"])
DYNAMICS_KEYS = ("reward_mean", "accuracy", "entropy", "length_mean", "staleness_mean", "staleness_max")
HIST_BINS = 10
META_MARK = "state"  # set when the run starts: its absence later means Redis lost the run's data
BROKER_CHECK_SECONDS = 10.0
"""While waiting this long for a step's samples, check that the broker still holds our newest version."""


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
        self.run_dir, self.run_id = Path(run_dir), run_id
        self.config = engine.config
        self.intake = Intake(client, self.config, tokenizer, feeder, run_id, consumer_name)
        self.status = LoopState()
        self.stop_requested = threading.Event()
        self.publisher = Publisher(transport, self.stop_requested)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.retention = StreamRetention(client, run_id, self.run_dir)
        self.tensorboard: Any = None  # opened at the first step
        self.ended: float | None = None  # monotonic time the last step ended (its weights out, next prompts out)

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
            self.intake.restore(state)
        for name in ("metrics.jsonl", "ledger.jsonl"):
            _truncate_after(self.run_dir / name, self.status.step)

    def _one_step(self) -> bool:
        """One step; its clock starts where the previous step's ended (`ended`), so the steps' `step_time`s add
        up to the run's wall time and the previous step's records and checkpoint count as this one's wait."""
        step = self.status.step
        started = self.ended if self.ended is not None else time.monotonic()
        groups = self._collect(step)
        if groups is None:
            return False
        waited = time.monotonic() - started
        sync = self.engine.schedule.sync_points(step + 1)
        plan = StepPlan(step, groups, sync.reference, sync.old_policy, gather=sync.publish)
        broadcast_plan(plan, self.engine.world_size)
        metrics, state = execute(self.engine, self.tokenizer, plan, self.run_dir)
        computed = time.monotonic()
        if sync.publish:
            self._publish(state, step + 1)
        self.status.step = step + 1
        # The next prompts go out before anything else: at s = 1 the generator idles until they do, while the
        # records and the checkpoint below are the trainer's own work (a crash here is a crash in `_collect`).
        self.feeder.top_up(self.status.step, self.status.version)
        self.ended = time.monotonic()
        self._record(step, groups, metrics, waited, computed - started - waited, self.ended - computed)
        if self.config.checkpoint_every and self.status.step % self.config.checkpoint_every == 0:
            self._checkpoint()
        return True

    def _finish(self) -> None:
        stopped = self.status.step < self.config.steps
        self.status.state = "stopping" if stopped else "training"
        self._checkpoint()
        if not stopped:
            self._run_plan(StepPlan(self.status.step, save_final=True))
        self._broadcast(StepPlan(self.status.step, stop=True))
        self.status.state = "stopped" if stopped else "done"
        if not stopped:
            mark_finished(self.run_dir, self.run_id, self.status.step, self.status.version)
        self._write_meta()
        log.info("trainer %s after step %d (version %d)", self.status.state, self.status.step, self.status.version)

    def _broadcast(self, plan: StepPlan) -> None:
        broadcast_plan(plan, self.engine.world_size)

    def _run_plan(self, plan: StepPlan) -> None:
        self._broadcast(plan)
        execute(self.engine, self.tokenizer, plan, self.run_dir)

    def _checkpoint(self) -> None:
        state = {"step": self.status.step, "version": self.status.version}
        self._run_plan(StepPlan(self.status.step, checkpoint=state | self.intake.counts()))
        self.intake.acknowledge()
        self.retention.trim()
        prune_checkpoints(self.run_dir / "checkpoints", self.config.keep_checkpoints)

    def _publish(self, state: dict | None, version: int) -> None:
        assert state is not None
        self.publisher.publish(state, version)
        self.status.version = version
        VERSION.set(version)

    def _republish_if_lost(self) -> None:
        """Publish the newest version again if the broker lost it and the weights still are that version."""
        version = self.status.version
        if version == 0 or self.status.step != version:
            return
        self.publisher.republish_if_lost(version, self._gather)

    def _gather(self) -> dict:
        """The full weights, gathered from every rank (as a publishing step does)."""
        plan = StepPlan(self.status.step, gather=True)
        self._broadcast(plan)
        _, state = execute(self.engine, self.tokenizer, plan, self.run_dir)
        assert state is not None
        return state

    def _collect(self, step: int) -> list[Group] | None:
        """Block until step `step`'s batch is complete (or a stop), keeping the feeder topped up and checking
        that the run's data and our newest version survive meanwhile."""
        checked = time.monotonic()
        while not self.intake.complete(step):
            if self.stop_requested.is_set():
                return None
            self._check_run_data()
            if time.monotonic() - checked > BROKER_CHECK_SECONDS:
                self._republish_if_lost()
                checked = time.monotonic()
            self.feeder.top_up(step, self.status.version)
            self.intake.read(step)
        return self.intake.take(step)

    # -- records -----------------------------------------------------------------------------------------

    def _record(
        self, step: int, groups: list[Group], metrics: dict, wait: float, compute: float, publish: float
    ) -> None:
        """Append the step's metrics row and ledger line, export the row, and log it."""
        row = self._row(step, groups, metrics, wait, compute, publish)
        _append(self.run_dir / "metrics.jsonl", row)
        ledger = {
            "step": step,
            "prompt_ids": [g.prompt_id for g in groups],
            "policy_versions": [g.version for g in groups],
        }
        _append(self.run_dir / "ledger.jsonl", ledger | {"samples": sum(len(g.rewards) for g in groups)})
        self.status.metrics = row
        self._export(step, row)
        self.retention.observe()
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

    def _row(
        self, step: int, groups: list[Group], metrics: dict, wait: float, compute: float, publish: float
    ) -> dict[str, Any]:
        """A step's line of `metrics.jsonl`: the update's metrics, the batch's dynamics and the step's timings."""
        rewards = [r for g in groups for r in g.rewards]
        math = [float(r >= 0.5) for g in groups if g.task == "math" for r in g.rewards]
        lengths = [len(c) for g in groups for c in g.completions]
        tokens = sum(len(g.prompt_ids) * len(g.completions) + sum(map(len, g.completions)) for g in groups)
        staleness = [step - g.version for g in groups]
        return {
            "step": step,
            "version": self.status.version,
            **{k: metrics.get(k) for k in ("loss", "chosen_logps", "rejected_logps", "margin", "entropy")},
            "reward_mean": _mean(rewards),
            "accuracy": _mean(math),
            "length_mean": _mean(lengths),
            "length_hist": _histogram(lengths, self.config.sampling.max_tokens),
            "staleness_mean": _mean(staleness),
            "staleness_max": max(staleness, default=None),
            **_termination(groups, self.tokenizer.eos_token_id),
            "pairs_kept": metrics.get("pairs_kept", 0),
            "pairs_skipped": metrics.get("pairs_skipped", 0),
            "rejected_rollouts": self.intake.rejected,
            "duplicates": self.intake.duplicates,
            "samples": len(rewards),
            "tokens_per_s": tokens / compute if compute > 0 else None,
            "time_wait": wait,
            "time_compute": compute,
            "time_publish": publish,
            "step_time": wait + compute + publish,
            **self.intake.stage_times(step),
            **{k: v for k, v in metrics.items() if k not in ("loss", "pairs_kept", "pairs_skipped")},
        }

    def _export(self, step: int, row: dict[str, Any]) -> None:
        """The row's numbers to TensorBoard (when installed) and Prometheus."""
        if self.tensorboard is None:
            self.tensorboard = _tensorboard(self.run_dir)
        if self.tensorboard:
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

    def _write_meta(self, first: bool = False) -> None:
        """Update the run's meta hash; after the first write, finding it gone means Redis lost the run."""
        fields = {"state": self.status.state, "step": self.status.step, "version": self.status.version}
        if not streams.update_meta(self.client, self.run_id, fields, mark=META_MARK) and not first:
            raise _data_lost(self.run_id)

    def _check_run_data(self) -> None:
        if not streams.meta_has(self.client, self.run_id, META_MARK):
            raise _data_lost(self.run_id)


def _data_lost(run_id: str) -> IntegrityError:
    return IntegrityError(
        f"Redis lost run {run_id}'s data (its meta hash {streams.meta_key(run_id)} vanished: Redis restarted "
        "without persistence or was flushed); in-flight prompts and samples are gone, so the run cannot go on "
        "exactly once. Turn Redis persistence on (appendonly yes; the chart and `cadence run` do) and restart the run"
    )


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard writer in `<run_dir>/tensorboard` when tensorboard is installed, else False."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    return SummaryWriter(str(run_dir / "tensorboard"))


def _mean(values: list[float] | list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _termination(groups: list[Group], eos_id: int) -> dict[str, float | None]:
    """Math samples ending with EOS, right and wrong apart, and the generating policy's log-prob of that EOS.

    The length-collapse signal: DPO's chosen are the right answers, so when right answers run on past the box
    to the length cap (`\\boxed{167}6}` still verifies) while wrong ones stop, EOS appears only on the rejected
    side, and each step pushes its log-probability down."""
    ended: dict[bool, list[float]] = {True: [], False: []}
    eos_logps: dict[bool, list[float]] = {True: [], False: []}
    for group in groups:
        if group.task != "math":
            continue
        logps = group.behavior_logps or [[] for _ in group.completions]
        for tokens, reward, sample_logps in zip(group.completions, group.rewards, logps, strict=True):
            stops = bool(tokens) and tokens[-1] == eos_id
            ended[reward >= 0.5].append(float(stops))
            if stops and len(sample_logps) == len(tokens):
                eos_logps[reward >= 0.5].append(sample_logps[-1])
    return {
        "eos_rate_correct": _mean(ended[True]),
        "eos_rate_incorrect": _mean(ended[False]),
        "eos_logp_correct": _mean(eos_logps[True]),
        "eos_logp_incorrect": _mean(eos_logps[False]),
    }


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
