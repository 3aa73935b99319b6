"""The fault tests' audit must be able to fail: each broken ledger below is caught."""

from __future__ import annotations

import copy

import pytest
from harness import BASE, check_ledger

from cadence.config import parse_run_config

CONFIG = parse_run_config(BASE | {"steps": 3, "batch_prompts": 2, "sync_every": 2})


def good() -> list[dict]:
    rows = []
    for step in range(3):
        version = 2 * (step // 2)
        ids = [f"t{step}.{slot}:toy-{step}+{slot}" for slot in range(2)]
        samples = 2 * CONFIG.sampling.n
        rows.append({"step": step, "prompt_ids": ids, "policy_versions": [version] * 2, "samples": samples})
    return rows


def test_a_correct_ledger_passes() -> None:
    check_ledger(good(), CONFIG)


@pytest.mark.parametrize(
    "damage",
    [
        lambda rows: rows.pop(1),  # a step missing
        lambda rows: rows.append(copy.deepcopy(rows[-1])),  # a step recorded twice
        lambda rows: rows[1]["prompt_ids"].pop(),  # a prompt missing from a batch
        lambda rows: rows[2]["prompt_ids"].__setitem__(0, rows[1]["prompt_ids"][0]),  # trained twice
        lambda rows: rows[1]["prompt_ids"].__setitem__(1, "t1.0:toy-again"),  # a slot filled twice
        lambda rows: rows[2]["policy_versions"].__setitem__(0, 0),  # stale version: cadence rule broken
        lambda rows: rows[1]["policy_versions"].__setitem__(0, 2),  # a version from the future
        lambda rows: rows[0].__setitem__("samples", rows[0]["samples"] - 1),  # a sample not scored
    ],
    ids=["missing-step", "step-twice", "missing-prompt", "prompt-twice", "slot-twice", "stale", "future", "samples"],
)
def test_a_broken_ledger_is_caught(damage) -> None:
    rows = good()
    damage(rows)
    with pytest.raises(AssertionError):
        check_ledger(rows, CONFIG)
