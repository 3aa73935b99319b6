"""The cadence rule (`cadence.trainer.schedule`), worked by hand: versions per step, block release, sync points."""

from __future__ import annotations

import pytest

from cadence.config import RunConfig
from cadence.errors import ConfigError
from cadence.trainer.schedule import Schedule, SyncPoints, VersionWindow, resolve_ref_sync_every


def of(**fields: object) -> Schedule:
    return Schedule.of(RunConfig.model_validate({"batch_prompts": 4, "steps": 10} | fields))


def windows(schedule: Schedule, steps: int) -> list[tuple[int, int]]:
    return [(w.oldest, w.newest) for w in map(schedule.versions, range(steps))]


def publishes(schedule: Schedule, done: range) -> list[int]:
    return [d for d in done if schedule.sync_points(d).publish]


def test_online_s1_step_t_trains_on_version_t() -> None:
    schedule = of(sync_every=1)
    assert windows(schedule, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert [schedule.min_version(t) for t in range(4)] == [0, 1, 2, 3]
    # Trainer at step 3 with version 3 published: step 3 may go, step 4 needs version 4 first.
    assert schedule.releasable(3, trainer_step=3, version=3)
    assert not schedule.releasable(4, trainer_step=3, version=3)
    assert publishes(schedule, range(1, 5)) == [1, 2, 3, 4]
    assert schedule.sync_points(1) == SyncPoints(publish=True, reference=True, old_policy=False)  # math: ref = s


def test_semi_online_s4_blocks_of_four() -> None:
    """Steps 0–3 → version 0, 4–7 → 4, 8–9 → 8; block 1 (steps 4–7) is released once version 4 is out."""
    schedule = of(sync_every=4)
    assert [w.newest for w in map(schedule.versions, range(10))] == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    assert all(w.oldest == w.newest for w in map(schedule.versions, range(10)))
    # max_inflight 2: trainer at step 2, version 0 → steps 2 and 3 may go; step 4 waits for version 4.
    assert [s for s in range(10) if schedule.releasable(s, trainer_step=2, version=0)] == [0, 1, 2, 3]
    assert not schedule.releasable(4, trainer_step=3, version=0)  # inside the in-flight bound, but version 0 < 4
    assert [s for s in range(4, 10) if schedule.releasable(s, trainer_step=4, version=4)] == [4, 5]
    assert publishes(schedule, range(1, 11)) == [4, 8]
    assert not schedule.releasable(10, trainer_step=10, version=8)  # the run has 10 steps


def test_offline_everything_at_once_from_the_seed() -> None:
    schedule = of(sync_every=None)
    assert schedule.offline
    assert windows(schedule, 3) == [(0, 0)] * 3 and schedule.versions(99) == VersionWindow(0, 0)
    assert all(schedule.releasable(s, trainer_step=0, version=0) for s in range(10))  # no in-flight bound
    assert not schedule.releasable(10, trainer_step=0, version=0)
    assert publishes(schedule, range(1, 11)) == []
    assert not any(schedule.sync_points(d).reference for d in range(1, 11))  # auto → s = null: the seed
    assert of(sync_every=None, async_lag=1).versions(7) == VersionWindow(0, 0)


def test_async_lag_1_widens_the_window_downwards_only() -> None:
    """s = 2, L = 1: step 4 (block 2) accepts versions 2..4 and is released once version 2 is out; block 0
    never goes below 0. The newest allowed version stays the step's sync point."""
    schedule = of(sync_every=2, async_lag=1)
    assert windows(schedule, 6) == [(0, 0), (0, 0), (0, 2), (0, 2), (2, 4), (2, 4)]
    assert schedule.min_version(4) == 2 and schedule.versions(4).newest == 4
    assert 2 in schedule.versions(4) and 4 in schedule.versions(4) and 0 not in schedule.versions(4)
    assert schedule.releasable(4, trainer_step=3, version=2)
    assert not of(sync_every=2).releasable(4, trainer_step=3, version=2)
    assert schedule.off_policy and not of(sync_every=2).off_policy
    assert publishes(schedule, range(1, 7)) == [2, 4, 6]  # the lag moves generation, not the publishes


def test_reference_fixed_synced_or_on_its_own_cadence() -> None:
    """s = 2: a fixed seed reference never moves; `auto` on math follows s; ref_sync_every = 3 moves at 3, 6."""
    fixed, synced, own = of(sync_every=2, ref_sync_every=None), of(sync_every=2), of(sync_every=2, ref_sync_every=3)
    done = range(1, 7)
    assert [d for d in done if fixed.sync_points(d).reference] == []
    assert [d for d in done if synced.sync_points(d).reference] == [2, 4, 6]
    assert [d for d in done if own.sync_points(d).reference] == [3, 6]
    assert publishes(own, done) == [2, 4, 6]


def test_ref_sync_auto_follows_the_paper() -> None:
    """`auto`: = s when every task is verifiable (math), a fixed seed reference otherwise; explicit wins."""
    assert resolve_ref_sync_every("auto", 4, {"math"}) == 4
    assert resolve_ref_sync_every("auto", 4, {"math", "chat"}) is None
    assert resolve_ref_sync_every("auto", None, {"math"}) is None
    assert resolve_ref_sync_every(3, 4, {"chat"}) == 3
    assert resolve_ref_sync_every("auto", 4, {"math"}, grpo=True) is None  # GRPO's KL reference stays the seed
    assert resolve_ref_sync_every(4, 4, {"math"}, grpo=True) == 4
    chat = {"name": "c", "kind": "chat", "dataset": "wildchat"}
    assert of(sync_every=4, tasks=[chat], reward_model="tiny-rm").ref_sync_every is None
    assert of(sync_every=4).ref_sync_every == 4


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, False),  # DPO needs no π_old
        # reference synced at every publish: it is π_old
        ({"algorithm": {"type": "grpo"}, "sync_every": 2, "ref_sync_every": 2}, False),
        ({"algorithm": {"type": "grpo"}, "sync_every": 2}, True),  # auto: GRPO's reference stays the seed
        ({"algorithm": {"type": "grpo"}, "sync_every": 2, "ref_sync_every": None}, True),
        ({"algorithm": {"type": "dpo", "grpo_coef": 0.5}, "sync_every": 2, "ref_sync_every": 4}, True),
        ({"algorithm": {"type": "grpo"}, "sync_every": None}, False),  # offline: reference = π_old = seed
    ],
)
def test_old_policy_copy_only_when_the_reference_follows_another_schedule(fields: dict, expected: bool) -> None:
    assert of(**fields).needs_old_policy is expected


def test_grpo_old_policy_moves_at_publishes_only_when_it_is_a_copy() -> None:
    """GRPO, s = 2, fixed reference: π_old (its own copy) moves at 2, 4; the reference never. With the
    reference synced at s, the reference itself is π_old, so no separate move."""
    fixed = of(algorithm={"type": "grpo"}, sync_every=2, ref_sync_every=None)
    assert [fixed.sync_points(d) for d in (1, 2)] == [
        SyncPoints(publish=False, reference=False, old_policy=False),
        SyncPoints(publish=True, reference=False, old_policy=True),
    ]
    synced = of(algorithm={"type": "grpo"}, sync_every=2, ref_sync_every=2)
    assert synced.sync_points(2) == SyncPoints(publish=True, reference=True, old_policy=False)


def test_plain_values_build_the_same_schedule_as_the_config() -> None:
    by_hand = Schedule(sync_every=4, ref_sync_every=4, async_lag=1, grpo=True, steps=10, max_inflight=3)
    config = {"sync_every": 4, "ref_sync_every": 4, "async_lag": 1, "max_inflight": 3, "algorithm": {"type": "grpo"}}
    assert of(**config) == by_hand
    assert Schedule(sync_every=2, ref_sync_every=None).releasable(10**6, trainer_step=10**6, version=10**6)


def test_window_reads_as_the_rejection_message_says() -> None:
    assert str(VersionWindow(2, 4)) == "2..4" and str(VersionWindow(3, 3)) == "3"


@pytest.mark.parametrize(
    "fields",
    [{"sync_every": 0}, {"sync_every": 1, "ref_sync_every": 0}, {"sync_every": 1, "async_lag": -1}],
)
def test_impossible_values_are_refused(fields: dict) -> None:
    with pytest.raises(ConfigError, match=">="):
        Schedule(**{"ref_sync_every": None} | fields)
