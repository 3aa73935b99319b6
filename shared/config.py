"""The run config: one YAML file, validated by pydantic, that says what a run trains and how.

The cadence is a field (`sync_every`), not a code path: `null` is offline DPO, `1` online, `s > 1`
semi-online; what the cadence fields mean step by step is `cadence.trainer.schedule`, the rule's one
home (this module only validates them). Errors name the field path and the fix. This module imports
no torch, so `--dry-run` and `--help` stay instant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cadence.errors import ConfigError

TaskKind = Literal["math", "chat"]
MAX_DEFAULT_CHECKPOINT_EVERY = 50


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The policy to train."""

    path: str = "tiny"
    """A local HF model directory, a hub id, or a seed-model name (`tiny`, `smollm2`)."""
    max_prompt_tokens: int = Field(256, gt=0)
    """Prompts longer than this are refused by the feeder."""


class TaskConfig(_Strict):
    """One prompt source; several are mixed by `weight`."""

    name: str
    """A label used in metrics and reports."""
    kind: TaskKind = "math"
    """`math`: rewards from math-verify against the reference; `chat`: rewards from the reward model."""
    dataset: str = "toy"
    """`toy`, `math500`, `amc23`, `numina`, `wildchat`, a JSONL/Parquet path, or a `datasets` name."""
    split: str = "train"
    """`train` or `test` for the toy task; the split for a `datasets` name."""
    weight: float = Field(1.0, gt=0)
    """Relative share of each batch drawn from this task."""
    limit: int | None = Field(None, gt=0)
    """Use at most this many prompts."""


class DPOConfig(_Strict):
    """Direct Preference Optimisation on pairs chosen from each prompt's samples."""

    type: Literal["dpo"] = "dpo"
    beta: float | None = Field(None, gt=0)
    """KL strength; null: by task kind, the paper's 0.1 when every task is verifiable (math), else 0.01
    (chat only, and the paper's mixed recipe)."""
    length_normalize: bool = False
    """Average instead of sum the log-probs over tokens."""
    nll_coef: float = Field(0.0, ge=0)
    """Weight of an extra NLL term on chosen responses."""
    nll_reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    """`token_mean`: NLL ÷ response length (Cadence's default); `sequence_sum`: summed over the response's
    tokens (the paper's code). A coefficient tuned for one does not carry over to the other."""
    group: bool = False
    """GroupDPO: use every correct × incorrect pair of a prompt, not one random pair."""
    grpo_coef: float = Field(0.0, ge=0)
    """α of the combined objective DPO + α·GRPO; 0 turns it off."""


class GRPOConfig(_Strict):
    """Group Relative Policy Optimisation with a PPO clip and a k3 KL penalty."""

    type: Literal["grpo"] = "grpo"
    kl_beta: float = Field(0.001, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    std_normalize: bool = False
    """Divide advantages by the group's std (+ε)."""
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "seq_mean_token_sum"] = "dr_grpo"
    """How token losses are reduced: `grpo`, `bnpo`, `dr_grpo` as TRL defines them (`dr_grpo`: sum ÷
    (B × max_tokens)); `seq_mean_token_sum`: sum per rollout, mean over rollouts, the paper's (no length
    normalisation, no max_tokens constant)."""


Algorithm = Annotated[DPOConfig | GRPOConfig, Field(discriminator="type")]


class SamplingConfig(_Strict):
    """How rollouts are sampled."""

    n: int = Field(8, ge=1, le=512)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    max_tokens: int = Field(14, ge=1)


class OptimizerConfig(_Strict):
    """AdamW. A large ε (1e-4) prevents sudden DPO collapse (the paper's stability finding)."""

    lr: float = Field(1e-6, gt=0)
    eps: float | None = Field(None, gt=0)
    """null: by task kind, the paper's 1e-4 when every task is verifiable (math), else 1e-8."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.1, gt=0)
    warmup_steps: int = Field(0, ge=0)


class DeepSpeedConfig(_Strict):
    """The DeepSpeed engine."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    bf16: bool | None = None
    """None: bf16 on GPU, fp32 on CPU."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Merged into the generated DeepSpeed JSON config."""


class EvalConfig(_Strict):
    """Held-out evaluation before and after training."""

    dataset: str = "toy"
    split: str = "test"
    samples: int = Field(1, ge=1)
    """k samples per problem; accuracy is averaged over them."""
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_problems: int | None = Field(500, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    """New tokens per answer; None: the run's `sampling.max_tokens`."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`auto`: the run's inference engine. `hf` avoids vLLM's start-up for tiny models."""


class InferenceConfig(_Strict):
    """The generation fleet of a local run."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    workers: int = Field(1, ge=1)


class RunConfig(_Strict):
    """A training run."""

    run_id: str = ""
    """Names the run's streams and folder; empty: derived from the config file name."""
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = Field(default_factory=lambda: [TaskConfig(name="toy")], min_length=1)
    algorithm: Algorithm = Field(default_factory=DPOConfig)
    sync_every: int | None = Field(1, ge=1)
    """s: optimizer steps between weight syncs. 1 online, >1 semi-online, null offline."""
    ref_sync_every: int | Literal["auto"] | None = "auto"
    """Steps between reference-model syncs; `auto`: = s for math, fixed seed (null) for chat."""
    async_lag: int = Field(0, ge=0)
    """Blocks a generator may run ahead of the rule (bounded off-policy; 0 is the paper's semantics)."""
    max_inflight: int = Field(2, ge=1)
    """Steps the feeder may enqueue ahead of the trainer."""
    steps: int = Field(60, ge=1)
    batch_prompts: int = Field(32, ge=1)
    """Prompts per optimizer step (the paper counts batches in prompts)."""
    reward_model: str = ""
    """Reward model for `chat` tasks: a directory, a hub id, or `tiny-rm` (built locally)."""
    strict_format: bool = False
    """Math rewards: a response that runs on past its last box scores 0 even when the box is right (the
    reward service's `CADENCE_STRICT_FORMAT`); keeps DPO from learning to drop EOS."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus."""
    entropy_reduction: Literal["token_mean", "rollout_sum"] = "token_mean"
    """`token_mean`: the batch's mean token entropy (Cadence's default); `rollout_sum`: each rollout's mean
    token entropy summed over rollouts ÷ prompts (the paper's code, where coefficients 1e-4 … 5e-4 apply)."""
    micro_batch_tokens: int = Field(8192, ge=16)
    """Padded tokens (prompt + completion) per forward/backward pass on one rank: a rank's shard is cut into
    micro-batches of at most this many tokens whose gradients accumulate into one optimizer step (a sequence
    longer than this is a micro-batch alone). The default is sized for the paper's configs: an 8B model
    with a 128k vocabulary holds ~2 GB of bf16 logits per 8192 tokens; lower it if activations do not fit."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    checkpoint_every: int | None = Field(None, ge=0)
    """Steps between checkpoints (0: only at a stop and at the end). Default: a twentieth of the run, at most
    every 50 steps, so a trainer killed without warning (a lost node) resumes near where it stopped."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on the volume (older ones are deleted); a benchmark that evaluates every checkpoint
    afterwards keeps them all."""

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise ValueError("run_id must be 1-63 characters of letters, digits, '_', '.', '-'")
        return value

    @field_validator("ref_sync_every")
    @classmethod
    def _positive_ref_sync(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("ref_sync_every must be >= 1, null (fixed seed reference) or 'auto'")
        return value

    @model_validator(mode="after")
    def _defaults_by_task_kind(self) -> RunConfig:
        """β and AdamW ε left null take the paper's values for the run's tasks (DESIGN.md §5)."""
        math_only = self.task_kinds == {"math"}
        if isinstance(self.algorithm, DPOConfig) and self.algorithm.beta is None:
            self.algorithm.beta = 0.1 if math_only else 0.01
        if self.optimizer.eps is None:
            self.optimizer.eps = 1e-4 if math_only else 1e-8
        return self

    @model_validator(mode="after")
    def _default_checkpoint_every(self) -> RunConfig:
        if self.checkpoint_every is None:
            self.checkpoint_every = min(MAX_DEFAULT_CHECKPOINT_EVERY, max(1, self.steps // 20))
        return self

    @model_validator(mode="after")
    def _micro_batches_are_cadences(self) -> RunConfig:
        owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
        if clash := sorted(owned & set(self.deepspeed.extra)):
            raise ValueError(
                f"deepspeed.extra sets {', '.join(clash)}: micro-batches and gradient accumulation follow "
                "micro_batch_tokens (tokens per forward/backward on one rank); set that instead"
            )
        return self

    @model_validator(mode="after")
    def _chat_needs_a_reward_model(self) -> RunConfig:
        if "chat" in self.task_kinds and not self.reward_model:
            raise ValueError("chat tasks are scored by a reward model: set reward_model (e.g. tiny-rm or a path)")
        return self

    @model_validator(mode="after")
    def _grpo_needs_groups(self) -> RunConfig:
        if self.uses_grpo and self.sampling.n < 2:
            raise ValueError("GRPO needs sampling.n >= 2 samples per prompt to form a group")
        if isinstance(self.algorithm, DPOConfig) and self.sampling.n < 2:
            raise ValueError("DPO needs sampling.n >= 2 samples per prompt to form a pair")
        return self

    @model_validator(mode="after")
    def _grpo_samples_the_trained_distribution(self) -> RunConfig:
        """GRPO's ratios π/π_old and importance weights are the trainer's log-softmax of the logits (T = 1,
        no nucleus), which equals the sampler's distribution only at temperature 1 with no top-p/top-k cut.
        Anything else samples another policy and the ratios would be silently off, so it is refused. DPO may
        sample at any setting: its loss never uses the sampler's log-probs, the settings only shape the pairs."""
        sampling = self.sampling
        if self.uses_grpo and (sampling.temperature != 1.0 or sampling.top_p < 1.0 or sampling.top_k > 0):
            raise ValueError(
                f"GRPO samples must come from the distribution the trainer scores (temperature 1, top_p 1, "
                f"top_k 0); got temperature {sampling.temperature}, top_p {sampling.top_p}, top_k "
                f"{sampling.top_k}, under which the ratios π/π_old would be computed for another policy. "
                "Set sampling.temperature: 1.0, top_p: 1.0, top_k: 0 (as the paper samples), or use DPO"
            )
        return self

    @property
    def offline(self) -> bool:
        return self.sync_every is None

    @property
    def task_kinds(self) -> set[str]:
        return {task.kind for task in self.tasks}

    @property
    def uses_grpo(self) -> bool:
        """Whether the loss has a GRPO part (GRPO, or DPO with `grpo_coef` > 0)."""
        return isinstance(self.algorithm, GRPOConfig) or self.algorithm.grpo_coef > 0


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid run config {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check its spelling against `cadence run --help-config`"
        elif item["type"] == "union_tag_invalid":
            message = "unknown algorithm type; use 'dpo' or 'grpo'"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def parse_run_config(data: Any, source: str = "<dict>") -> RunConfig:
    """Validate a mapping as a run config; raise `ConfigError` naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid run config {source}: the top level must be a mapping of fields")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config; `overrides` are `dotted.key=yaml_value` strings applied on top."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist; pass the path to a YAML file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"run config {path} is not valid YAML: {error}") from None
    if isinstance(data, dict):
        for override in overrides or []:
            _apply_override(data, override)
        data.setdefault("run_id", path.stem)
    return parse_run_config(data, str(path))


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like 'dotted.key=value', e.g. 'steps=10'")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def dump_run_config(config: RunConfig) -> str:
    """The config as YAML, every default filled in (what the run really used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
