"""The DeepSpeed engine on the real tiny model (CPU, one process): masking, a step that learns, syncs, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cadence.config import RunConfig
from cadence.trainer.engine import SequenceBatch, TrainEngine, deepspeed_config
from cadence.trainer.update import Group, StepPlan, execute, update

torch.set_num_threads(1)


def config(**overrides: object) -> RunConfig:
    base = {"optimizer": {"lr": 1e-3, "eps": 1e-4, "grad_clip": 1.0}, "sampling": {"n": 4, "max_tokens": 6}}
    return RunConfig.model_validate(base | overrides)


# Two prompts (ids as the toy tokenizer would give), four samples each, two correct per prompt.
GROUPS = [
    Group("p0", "math", 0, [1, 5, 6, 7], [[10, 11, 2], [12, 2], [13, 14, 2], [15, 2]], [1.0, 0.0, 1.0, 0.0]),
    Group("p1", "math", 0, [1, 8, 9], [[16, 17, 2], [18, 2], [19, 2], [20, 21, 22, 2]], [0.0, 1.0, 0.0, 1.0]),
]


@pytest.fixture(scope="module")
def dpo_engine(untrained_tiny_model_dir: Path) -> TrainEngine:
    return TrainEngine(untrained_tiny_model_dir, config())


def test_batch_masks_prompt_and_padding() -> None:
    """Prompt (1, 5, 6) + completion (7, 2) and prompt (1,) + completion (9,), right-padded with 0:
    completion positions are 3–4 and 1 respectively; the [L−1] mask is shifted left by one."""
    batch = SequenceBatch.from_token_ids([[1, 5, 6], [1]], [[7, 2], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2], [1, 9, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]


def test_token_logps_match_a_plain_forward_on_completion_tokens_only(dpo_engine: TrainEngine) -> None:
    batch = SequenceBatch.from_token_ids([[1, 5, 6], [1]], [[7, 2], [9]], pad_id=dpo_engine.pad_token_id)
    stats = dpo_engine.reference_stats(batch)
    with torch.no_grad():
        logits = dpo_engine.reference(input_ids=torch.tensor([[1, 5, 6, 7, 2]])).logits[0]
    expected = torch.log_softmax(logits, -1)
    assert stats.logps[0, 2].item() == pytest.approx(expected[2, 7].item(), abs=1e-5)  # P(7 | 1 5 6)
    assert stats.logps[0, 3].item() == pytest.approx(expected[3, 2].item(), abs=1e-5)  # P(2 | 1 5 6 7)
    assert stats.mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert (stats.logps[stats.mask == 0] == 0).all()
    assert stats.lengths().tolist() == [2, 1]
    assert (stats.entropy == 0).all()  # frozen models skip the entropy: only the policy's is watched
    with torch.no_grad():
        policy = dpo_engine.policy_stats(batch)
    assert (policy.entropy[policy.mask == 0] == 0).all()
    # Entropy of a random-init model over a 36-token vocabulary is close to log 36.
    assert 0.5 * math.log(36) < policy.entropy[0, 2].item() <= math.log(36) + 1e-5


def test_one_dpo_step_lowers_the_loss(dpo_engine: TrainEngine) -> None:
    """At the start policy = reference, so the DPO loss is log 2; after one AdamW step the same batch (same
    step, so the same seeded pairs) has a lower loss, measured by the next update before it steps."""
    metrics = update(dpo_engine, GROUPS, step=0)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["pairs_kept"] == 2 and metrics["pairs_skipped"] == 0
    assert metrics["grad_norm"] > 0
    assert update(dpo_engine, GROUPS, step=0)["loss"] < math.log(2) - 1e-3


def test_one_grpo_step_lowers_the_loss(untrained_tiny_model_dir: Path) -> None:
    engine = TrainEngine(untrained_tiny_model_dir, config(algorithm={"type": "grpo", "aggregation": "dr_grpo"}))
    before = update(engine, GROUPS, step=0)
    assert before["ratio_mean"] == pytest.approx(1.0) and before["kl"] == pytest.approx(0.0, abs=1e-7)
    assert update(engine, GROUPS, step=0)["loss"] < before["loss"] - 1e-4


def test_reference_changes_exactly_when_synced(dpo_engine: TrainEngine) -> None:
    """A step without `sync_reference` leaves the reference alone; a plan with it copies the policy."""
    before = {k: v.clone() for k, v in dpo_engine.reference.state_dict().items()}
    execute(dpo_engine, None, StepPlan(1, GROUPS), Path("/nonexistent"))
    assert all(torch.equal(before[k], v) for k, v in dpo_engine.reference.state_dict().items())
    policy = dpo_engine.full_state_dict()
    assert not all(torch.equal(policy[k], before[k]) for k in before)
    execute(dpo_engine, None, StepPlan(2, sync_reference=True), Path("/nonexistent"))
    assert all(torch.equal(policy[k], v) for k, v in dpo_engine.reference.state_dict().items())


def test_checkpoint_round_trip(dpo_engine: TrainEngine, untrained_tiny_model_dir: Path, tmp_path: Path) -> None:
    dpo_engine.save_checkpoint(tmp_path, "step-3", {"cadence": {"step": 3, "version": 2}})
    saved = dpo_engine.full_state_dict()
    fresh = TrainEngine(untrained_tiny_model_dir, config())
    assert fresh.load_checkpoint(tmp_path / "missing") is None
    state = fresh.load_checkpoint(tmp_path)
    assert state is not None and state["cadence"] == {"step": 3, "version": 2}
    restored = fresh.full_state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    ref = dpo_engine.reference.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in fresh.reference.state_dict().items())


def test_deepspeed_config_merges_extra() -> None:
    extra = {"zero_optimization": {"overlap_comm": False}}
    ds = deepspeed_config(config(deepspeed={"zero_stage": 2, "extra": extra}), False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False}


def test_dpo_plus_alpha_grpo_by_hand(untrained_tiny_model_dir: Path) -> None:
    """At the start π = π_ref = π_old: DPO = log 2; GRPO has ratio 1 and KL 0, so its loss is −Σ A·len over
    B·max_len. Group p0: A = (.5, −.5, .5, −.5), lengths (3, 2, 3, 2) → Σ A·len = 1.0; p1: A = (−.5, .5, −.5, .5),
    lengths (3, 2, 2, 4) → 0.5. GRPO = −1.5 / (8 · 6) = −0.03125; α = 0.5 → 0.693147 − 0.015625 = 0.677522."""
    engine = TrainEngine(untrained_tiny_model_dir, config(algorithm={"type": "dpo", "grpo_coef": 0.5}))
    metrics = update(engine, GROUPS, step=0)
    assert metrics["loss"] == pytest.approx(math.log(2) - 0.015625, abs=1e-5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6) and metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_zero3_gathers_full_weights_and_still_learns(untrained_tiny_model_dir: Path, tmp_path: Path) -> None:
    """Under ZeRO-3 each parameter lives partitioned; the published state dict must hold the full tensors."""
    engine = TrainEngine(untrained_tiny_model_dir, config(deepspeed={"zero_stage": 3}))
    seed = AutoModelForCausalLM.from_pretrained(untrained_tiny_model_dir).state_dict()
    assert update(engine, GROUPS, step=0)["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert update(engine, GROUPS, step=0)["loss"] < math.log(2) - 1e-3
    state = engine.full_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in seed.items()}
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], seed["model.layers.0.mlp.up_proj.weight"])
    engine.save_pretrained(tmp_path / "final", AutoTokenizer.from_pretrained(untrained_tiny_model_dir))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in seed)


@pytest.mark.parametrize(
    "fields",
    [
        # GroupDPO with an NLL term and an entropy bonus: every shard-wide normaliser is in play.
        {"algorithm": {"type": "dpo", "group": True, "nll_coef": 0.5}, "entropy_coef": 0.01},
        {
            "algorithm": {"type": "grpo", "aggregation": "bnpo"},
            "entropy_coef": 0.01,
            "entropy_reduction": "rollout_sum",
        },
        {"algorithm": {"type": "grpo", "aggregation": "seq_mean_token_sum"}},
        {"algorithm": {"type": "dpo", "grpo_coef": 0.5}},
    ],
)
def test_micro_batches_equal_the_one_shot_update(untrained_tiny_model_dir: Path, fields: dict) -> None:
    """The same step with the shard in one pass and cut into micro-batches of ≤ 16 tokens (one sequence
    each here; GROUPS' sequences are 5–8 tokens): same loss, metrics, grad norm and weights after the step."""
    one = TrainEngine(untrained_tiny_model_dir, config(**fields))
    many = TrainEngine(untrained_tiny_model_dir, config(**fields, micro_batch_tokens=16))
    whole, split = update(one, GROUPS, step=0), update(many, GROUPS, step=0)
    assert split.keys() == whole.keys()
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    after_one, after_many = one.full_state_dict(), many.full_state_dict()
    assert all(torch.allclose(after_one[k], after_many[k], atol=1e-6) for k in after_one)
