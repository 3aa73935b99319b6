"""Run-config validation: every bad input names the field and the fix."""

from pathlib import Path

import pytest

from cadence.config import DPOConfig, GRPOConfig, load_run_config, parse_run_config
from cadence.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_paper() -> None:
    config = parse_run_config({})
    assert isinstance(config.algorithm, DPOConfig)
    assert config.algorithm.beta == 0.1
    assert config.optimizer.eps == 1e-4
    assert config.optimizer.grad_clip == 0.1


def test_algorithm_is_a_discriminated_union(tmp_path: Path) -> None:
    config = load_run_config(write(tmp_path, "algorithm: {type: grpo, kl_beta: 0.01}\nsampling: {n: 8}\n"))
    assert isinstance(config.algorithm, GRPOConfig)
    assert config.algorithm.kl_beta == 0.01
    assert config.run_id == "run"


def test_unknown_algorithm_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"algorithm: unknown algorithm type; use 'dpo' or 'grpo'"):
        load_run_config(write(tmp_path, "algorithm: {type: ppo}\n"))


@pytest.mark.parametrize("value", [0, -3])
def test_sync_every_must_be_positive(tmp_path: Path, value: int) -> None:
    with pytest.raises(ConfigError, match=r"sync_every: .*greater than or equal to 1"):
        load_run_config(write(tmp_path, f"sync_every: {value}\n"))


def test_bad_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.yaml is not valid YAML"):
        load_run_config(write(tmp_path, "steps: [1, 2\n"))


def test_unknown_field_is_reported_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: unknown field"):
        load_run_config(write(tmp_path, "optimizer: {learning_rate: 0.1}\n"))


def test_missing_file_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_run_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_apply_dotted_keys(tmp_path: Path) -> None:
    config = load_run_config(write(tmp_path, "steps: 5\n"), ["steps=7", "optimizer.lr=0.001", "sync_every=null"])
    assert config.steps == 7
    assert config.optimizer.lr == 0.001
    assert config.offline


def test_malformed_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_run_config(write(tmp_path, "steps: 5\n"), ["steps"])


def test_dpo_needs_two_samples() -> None:
    with pytest.raises(ConfigError, match=r"sampling\.n >= 2"):
        parse_run_config({"sampling": {"n": 1}})


@pytest.mark.parametrize(
    ("algorithm", "sampling"),
    [
        ({"type": "grpo"}, {"temperature": 0.7}),
        ({"type": "grpo"}, {"top_p": 0.9}),
        ({"type": "grpo"}, {"top_k": 20}),
        ({"type": "dpo", "grpo_coef": 0.5}, {"temperature": 0.6}),  # DPO + α·GRPO has a GRPO part
    ],
)
def test_grpo_refuses_sampling_the_trainer_does_not_score(algorithm: dict, sampling: dict) -> None:
    """π/π_old is the log-softmax of the logits (T = 1, no nucleus): other sampling would skew it silently."""
    with pytest.raises(ConfigError, match=r"temperature: 1\.0, top_p: 1\.0, top_k: 0"):
        parse_run_config({"algorithm": algorithm, "sampling": sampling})


def test_dpo_samples_at_any_temperature() -> None:
    config = parse_run_config({"algorithm": {"type": "dpo"}, "sampling": {"temperature": 0.7, "top_p": 0.9}})
    assert config.sampling.temperature == 0.7


def test_bad_run_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="run_id"):
        parse_run_config({"run_id": "a b/c"})


def test_chat_tasks_need_a_reward_model() -> None:
    with pytest.raises(ConfigError, match="set reward_model"):
        parse_run_config({"tasks": [{"name": "c", "kind": "chat", "dataset": "wildchat"}]})


@pytest.mark.parametrize(
    ("kinds", "beta", "eps"),
    [
        (["math"], 0.1, 1e-4),  # verifiable rewards: the paper's math recipe
        (["chat"], 0.01, 1e-8),  # reward-model rewards
        (["math", "chat"], 0.01, 1e-8),  # the paper's mixed recipe
    ],
)
def test_beta_and_eps_default_by_task_kind(kinds: list[str], beta: float, eps: float) -> None:
    tasks = [{"name": kind, "kind": kind} for kind in kinds]
    config = parse_run_config({"tasks": tasks, "reward_model": "tiny-rm"})
    assert config.algorithm.beta == beta and config.optimizer.eps == eps
    explicit = parse_run_config({"tasks": tasks, "reward_model": "tiny-rm", "algorithm": {"type": "dpo", "beta": 0.3}})
    assert explicit.algorithm.beta == 0.3


def test_deepspeed_batch_settings_are_refused_for_micro_batch_tokens() -> None:
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        parse_run_config({"deepspeed": {"extra": {"gradient_accumulation_steps": 4}}})


@pytest.mark.parametrize(("steps", "every"), [(40, 2), (800, 40), (2000, 50), (10, 1)])
def test_checkpoints_default_to_a_twentieth_of_the_run_at_most_every_50_steps(steps: int, every: int) -> None:
    """A trainer killed without warning (a lost node) resumes near where it stopped, not at step 0."""
    assert parse_run_config({"steps": steps}).checkpoint_every == every
    assert parse_run_config({"steps": steps, "checkpoint_every": 0}).checkpoint_every == 0  # only at stop and end
