"""The cadence rule (DESIGN.md §2) in one place: the versions each step may train on, when the feeder may
release a step's prompts, and after which steps the trainer publishes its weights and moves its reference
and GRPO's old policy. Pure: plain values in, answers out. The feeder, the intake, the loop and the engine
ask it; none of them recomputes the rule.

Version v is the optimizer step after which the weights were published (the seed model is 0); s = sync_every.
- Step t's sync point is s·⌊t/s⌋ (0 offline, s = null): the newest version step t may use and, with
  `async_lag` 0, the only one — every sample of step t comes from exactly the weights of the last sync.
- `async_lag` L lets step t use versions down to L blocks earlier, s·(⌊t/s⌋ − L), never below 0. That oldest
  version is the `min_version` a prompt carries, and step t is released once it is published, so block k
  may start generating L blocks before version k·s exists (bounded off-policy).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Literal

from cadence.config import RunConfig
from cadence.errors import ConfigError


def resolve_ref_sync_every(
    ref_sync_every: int | Literal["auto"] | None, sync_every: int | None, task_kinds: Set[str], *, grpo: bool = False
) -> int | None:
    """`auto` → s for DPO when every task is verifiable, else a fixed seed reference (null).

    The paper syncs DPO's reference with the generator on verifiable tasks and keeps it fixed on chat. It
    says no such thing of GRPO, whose KL penalty (DeepSeekMath) holds the policy near the seed: a reference
    moved at every sync would be π_old itself, the k3 term ≈ 0 and its β meaningless. So a GRPO run
    (`grpo`: the algorithm is GRPO; DPO + α·GRPO follows DPO's rule) keeps the seed reference under `auto`.
    """
    if ref_sync_every != "auto":
        return ref_sync_every
    return sync_every if set(task_kinds) == {"math"} and not grpo else None


@dataclass(frozen=True)
class VersionWindow:
    """The policy versions one step accepts: `oldest` … `newest`, both included."""

    oldest: int
    newest: int

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and self.oldest <= version <= self.newest

    def __str__(self) -> str:
        return f"{self.oldest}" if self.oldest == self.newest else f"{self.oldest}..{self.newest}"


@dataclass(frozen=True)
class SyncPoints:
    """What happens after a step: publish the weights, move the reference, move GRPO's separate π_old."""

    publish: bool
    reference: bool
    old_policy: bool


@dataclass(frozen=True)
class Schedule:
    """The cadence rule of one run, from plain values (`Schedule.of(config)` for a run config).

    `ref_sync_every` is resolved (`resolve_ref_sync_every`): an int, or None for a fixed seed reference.
    `grpo`: the loss has a GRPO part, whose old policy π_old is the snapshot of the last weight sync.
    """

    sync_every: int | None
    ref_sync_every: int | None
    async_lag: int = 0
    grpo: bool = False
    steps: int | None = None
    """Steps of the run; None: no end."""
    max_inflight: int = 2
    """Steps the feeder may release ahead of the trainer (online and semi-online)."""

    def __post_init__(self) -> None:
        for name in ("sync_every", "ref_sync_every", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null, not {value}")
        if self.async_lag < 0 or self.max_inflight < 1:
            raise ConfigError(f"async_lag must be >= 0 ({self.async_lag}) and max_inflight >= 1 ({self.max_inflight})")

    @classmethod
    def of(cls, config: RunConfig) -> Schedule:
        """The schedule a run config asks for."""
        return cls(
            sync_every=config.sync_every,
            ref_sync_every=resolve_ref_sync_every(
                config.ref_sync_every, config.sync_every, config.task_kinds, grpo=config.algorithm.type == "grpo"
            ),
            async_lag=config.async_lag,
            grpo=config.uses_grpo,
            steps=config.steps,
            max_inflight=config.max_inflight,
        )

    @property
    def offline(self) -> bool:
        """No weight sync ever: the whole run trains on samples of the seed model."""
        return self.sync_every is None

    @property
    def off_policy(self) -> bool:
        """Whether a step may train on samples older than its sync point (they then need importance weights)."""
        return self.async_lag > 0

    @property
    def needs_old_policy(self) -> bool:
        """Whether GRPO's π_old needs its own copy: only when the reference moves on another schedule than the
        weight syncs (otherwise the reference *is* the snapshot of the last sync)."""
        return self.grpo and self.ref_sync_every != self.sync_every

    def versions(self, step: int) -> VersionWindow:
        """The versions whose samples step `step` may train on; `newest` is the step's sync point s·⌊t/s⌋."""
        if self.sync_every is None:
            return VersionWindow(0, 0)
        newest = self.sync_every * (step // self.sync_every)
        return VersionWindow(max(0, newest - self.async_lag * self.sync_every), newest)

    def min_version(self, step: int) -> int:
        """The `min_version` tag of step `step`'s prompts: a worker must hold at least this version."""
        return self.versions(step).oldest

    def releasable(self, step: int, trainer_step: int, version: int) -> bool:
        """May the prompts of `step` be enqueued, with the trainer at `trainer_step` and `version` published?

        Offline every step is released at once; otherwise once its `min_version` is published and while it is
        fewer than `max_inflight` steps ahead of the trainer."""
        if self.steps is not None and step >= self.steps:
            return False
        if self.offline:
            return True
        return version >= self.min_version(step) and step < trainer_step + self.max_inflight

    def sync_points(self, done: int) -> SyncPoints:
        """After `done` steps: publish every s; the reference every `ref_sync_every`; a separate π_old at
        every publish (when there is one)."""
        publish = self.sync_every is not None and done % self.sync_every == 0
        return SyncPoints(
            publish=publish,
            reference=self.ref_sync_every is not None and done % self.ref_sync_every == 0,
            old_policy=publish and self.needs_old_policy,
        )
