"""Fault injection on real local runs: start a short toy run as real processes (the launcher's own
`LocalRun`), SIGKILL (or freeze) one service at a chosen moment, restart it with the same arguments and
environment, let the run finish, then audit the run's ledger and its Redis streams (with the entries the
trainer trimmed from them, archived in the run folder).

The audit is what Cadence promises (README "Guarantees"): every step recorded once with its full batch,
every prompt generated, scored and trained on exactly once, policy versions following the cadence rule
and never going backwards.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from cadence import streams
from cadence.app.launcher import LocalRun, ServiceFailed, make_plan
from cadence.config import RunConfig, dump_run_config, parse_run_config
from cadence.trainer import retention
from cadence.trainer.schedule import Schedule

RECLAIM_IDLE_MS = 3000
"""Workers take over a dead worker's entries after this long (30 s in production; short so tests are quick)."""

BASE = {
    "run_id": "fault",
    "algorithm": {"type": "dpo", "beta": 0.1},
    "sync_every": 1,
    "steps": 16,
    "batch_prompts": 4,
    "sampling": {"n": 8, "max_tokens": 14},
    "optimizer": {"lr": 5.0e-4, "eps": 1.0e-4, "grad_clip": 1.0},
    "tasks": [{"name": "toy-addition", "kind": "math", "dataset": "toy", "split": "train"}],
    "inference": {"engine": "hf", "workers": 1},
}

Moment = Callable[["FaultRun"], bool]


@dataclass
class Fault:
    """What to do to which service, and when."""

    service: str
    """A supervisor child: `redis`, `broker`, `reward`, `inference0`, `trainer`."""
    moment: str
    """A key of `MOMENTS`."""
    action: str = "kill"
    """`kill`: SIGKILL, restart after `down_seconds`; `freeze`: SIGSTOP, SIGCONT after `down_seconds`;
    `wipe` (Redis only): SIGKILL, restart with persistence off, so it comes back empty."""
    down_seconds: float = 0.5
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = "-".join(f"{k}{v}" for k, v in self.overrides.items())
        return "-".join(filter(None, [self.action, self.service, self.moment, extra]))


def after_step(n: int) -> Moment:
    return lambda run: len(run.metrics()) >= n


def pending_at(kind: streams.Kind) -> Moment:
    """Some entry of `kind` is delivered to its stage but not yet acknowledged (work in progress)."""
    return lambda run: run.pending(kind) > 0


MOMENTS: dict[str, Moment] = {
    "step1": after_step(1),
    "step2": after_step(2),
    "step4": after_step(4),
    "step6": after_step(6),
    "step8": after_step(8),
    "mid-generation": pending_at("prompts"),
    "mid-scoring": pending_at("rollouts"),
}


class _Local(LocalRun):
    """The launcher's run, but `start` returns once every service except the trainer answers its health check:
    the harness follows the trainer from its first step (a toy step takes a fraction of a second)."""

    not_waited_for = ("redis", "trainer")


class FaultRun:
    """One local run under test (services as real processes, logs in `<run_dir>/logs`)."""

    def __init__(self, local: LocalRun) -> None:
        self.local = local
        self.config = local.plan.config
        self.run_dir = local.plan.run_dir
        self.redis = redis.Redis.from_url(local.plan.redis_url, socket_timeout=2)
        self.events: list[str] = []

    def metrics(self) -> list[dict]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def pending(self, kind: streams.Kind) -> int:
        try:
            summary = self.redis.xpending(streams.stream_key(self.config.run_id, kind), streams.GROUPS[kind])
        except redis.RedisError:
            return 0
        return int(summary["pending"])

    def length(self, kind: streams.Kind) -> int:
        try:
            return int(self.redis.xlen(streams.stream_key(self.config.run_id, kind)))
        except redis.RedisError:
            return 0

    def wait_for(self, moment: Moment, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not moment(self):
            self._raise_if_failed()
            if not self.local.trainer().alive:
                raise AssertionError(f"the run ended before {what}; the fault could not be injected")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.002)  # scoring a batch takes a few milliseconds

    def inject(self, fault: Fault) -> None:
        """Wait for the fault's moment, then kill and restart (or freeze and thaw) its service."""
        self.wait_for(MOMENTS[fault.moment], f"moment {fault.moment}")
        supervisor = self.local.supervisor
        self.events.append(f"{fault.action} {fault.service} at step {len(self.metrics())}")
        if fault.action == "kill":
            supervisor.kill(fault.service)
            time.sleep(fault.down_seconds)
            supervisor.restart(fault.service)
        elif fault.action == "wipe":  # Redis back without persistence: it comes up empty
            supervisor.kill(fault.service)
            args = supervisor.child(fault.service).args
            args[args.index("--appendonly") + 1] = "no"
            supervisor.restart(fault.service)
        elif fault.action == "freeze":
            supervisor.kill(fault.service, signal.SIGSTOP)
            time.sleep(fault.down_seconds)
            supervisor.kill(fault.service, signal.SIGCONT)
        else:
            raise ValueError(f"unknown action {fault.action!r}; use kill, freeze or wipe")

    def finish(self, timeout: float = 240.0) -> None:
        """Wait until the trainer exits 0; raise `ServiceFailed` when a service (the trainer included) dies."""
        deadline = time.monotonic() + timeout
        trainer = self.local.trainer()
        while trainer.returncode != 0:
            self._raise_if_failed()
            if trainer.returncode is not None:
                raise ServiceFailed(trainer)
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not finish in {timeout:.0f}s ({self.events})\n{self.logs()}")
            time.sleep(0.2)

    def _raise_if_failed(self) -> None:
        self.local.raise_if_failed()

    def stream_prompt_ids(self) -> dict[str, list[str]]:
        """The prompt id of every entry the run's three streams were ever given: the entries the trainer
        trimmed (archived in `<run_dir>/streams/`) and those still in Redis (read with XRANGE)."""
        found: dict[str, list[str]] = {}
        for kind in retention.MESSAGES:
            entries = retention.archived(self.run_dir, kind)
            for raw_id, fields in self.redis.xrange(streams.stream_key(self.config.run_id, kind)):
                message = retention.MESSAGES[kind].FromString(fields[streams.FIELD])
                entries[raw_id.decode()] = retention.prompt_id(kind, message)
            found[kind] = list(entries.values())
        return found

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {c.name}\n{c.tail(lines)}" for c in self.local.supervisor.children)

    def stop(self) -> None:
        self.local.stop()
        self.redis.close()


def start_run(
    runs_root: Path, model_dir: Path, overrides: dict[str, Any] | None = None, redis_url: str = ""
) -> FaultRun:
    """Start a toy run's services (a private AOF Redis unless `redis_url` is given) and wait until healthy."""
    config = parse_run_config(_merge(BASE, overrides or {}))
    plan = make_plan(config, runs_root, redis_url=redis_url, engine="hf")
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text(dump_run_config(plan.config))
    local = _Local(plan, str(model_dir))
    local.supervisor.env["CADENCE_RECLAIM_IDLE_MS"] = str(RECLAIM_IDLE_MS)
    local.supervisor.env["CADENCE_POOL_PROCESSES"] = "1"
    try:
        local.start()
    except BaseException:
        local.stop()
        raise
    return FaultRun(local)


def audit(run: FaultRun) -> dict[str, Any]:
    """Check the finished run's ledger and streams against the guarantees; returns a summary for reports."""
    config = run.config
    ledger = read_jsonl(run.run_dir / "ledger.jsonl")
    check_ledger(ledger, config)
    messages = run.stream_prompt_ids()
    prompt_ids = messages["prompts"]
    expected = sorted(pid for row in ledger for pid in row["prompt_ids"])
    assert sorted(prompt_ids) == expected, (
        "the feeder enqueued a prompt twice or one the trainer never used: "
        f"enqueued twice {[p for p, n in Counter(prompt_ids).items() if n > 1]}, "
        f"trained twice {[p for p, n in Counter(expected).items() if n > 1]}, "
        f"never trained {sorted(set(prompt_ids) - set(expected))}, "
        f"never enqueued {sorted(set(expected) - set(prompt_ids))}"
    )
    for kind, ids in (("rollouts", messages["rollouts"]), ("scored", messages["scored"])):
        twice = [pid for pid, count in Counter(ids).items() if count > 1]
        assert not twice, f"{kind}: prompts written more than once: {twice}"
        assert sorted(ids) == expected, f"{kind}: prompts missing: {sorted(set(expected) - set(ids))}"
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == list(range(config.steps)), "metrics.jsonl must hold each step once"
    return {
        "steps": len(ledger),
        "prompts": len(expected),
        "events": run.events,
        "duplicates_dropped": metrics[-1].get("duplicates", 0),
        "rejected": metrics[-1].get("rejected_rollouts", 0),
    }


def check_ledger(ledger: list[dict], config: RunConfig) -> None:
    """Every step once, in order, with `batch_prompts` distinct prompts of that step, each trained once,
    at the version the cadence rule names, versions never decreasing."""
    assert [row["step"] for row in ledger] == list(range(config.steps)), [row["step"] for row in ledger]
    seen: set[str] = set()
    schedule = Schedule.of(config)
    previous = 0
    for row in ledger:
        step, ids = row["step"], row["prompt_ids"]
        slots = sorted(int(pid.split(":", 1)[0].split(".", 1)[1]) for pid in ids)
        assert slots == list(range(config.batch_prompts)), f"step {step}: prompt slots {slots}"
        assert all(pid.startswith(f"t{step}.") for pid in ids), f"step {step} trained another step's prompt: {ids}"
        assert not seen & set(ids), f"step {step}: prompts trained twice: {seen & set(ids)}"
        seen |= set(ids)
        synced = schedule.versions(step).newest  # the step's sync point: with async_lag 0 the only version
        assert set(row["policy_versions"]) == {synced}, f"step {step}: cadence rule broken: {row}"
        assert min(row["policy_versions"]) >= previous, f"step {step}: policy version went backwards"
        previous = max(row["policy_versions"])
        assert row["samples"] == config.batch_prompts * config.sampling.n, row


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]  # a line being written is not read yet
    return [json.loads(line) for line in complete.splitlines() if line.strip()]
