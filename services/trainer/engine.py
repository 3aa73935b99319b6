"""The training engine: a DeepSpeed-wrapped causal LM, its frozen reference, log-probs, state dicts, checkpoints.

The only module that imports DeepSpeed. `TrainEngine` builds the engine from the run config (ZeRO 0–3,
bf16 on GPU / fp32 on CPU, gradient clipping, torch's AdamW as the client optimizer with the config's ε),
computes per-token log-probs and entropies of (prompt, completion) sequences, steps, gathers the full
state dict for publishing (ZeRO-3 included) and saves/loads DeepSpeed checkpoints. Where DeepSpeed
cannot be imported it falls back to plain torch (single process only).

Every method marked *collective* must be called by every rank in the same order.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cadence.config import RunConfig
from cadence.errors import ConfigError
from cadence.logging import get_logger
from cadence.net import free_port
from cadence.paths import cadence_home
from cadence.trainer.logprobs import selective_stats
from cadence.trainer.schedule import Schedule

try:
    import deepspeed
except ImportError:  # the plain-torch fallback below
    deepspeed = None

log = get_logger(__name__)
FROZEN_FILE = "frozen.pt"


def ensure_dist_env() -> int:
    """Fill in what `torch.distributed` needs for a single process; point JIT builds at the cache.

    Launchers (torchrun, `deepspeed`) set RANK/WORLD_SIZE/...; a plain `cadence serve trainer` does not.
    Returns the world size.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cadence_home() / "torch_extensions"))
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return int(os.environ["WORLD_SIZE"])


def _skip_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~75 s) when it starts, but uses
    it only in `inference_all_reduce` (tensor-parallel inference); training all-reduces through
    torch.distributed (gloo). Marking the op unavailable skips the build, for one process or many."""
    if deepspeed is not None and not torch.cuda.is_available():
        from deepspeed import ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(config: RunConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for a run; `config.deepspeed.extra` is merged on top (nested dicts merged).

    Micro-batch size and accumulation steps stay 1: Cadence sizes micro-batches in tokens
    (`micro_batch_tokens`) and marks the accumulation boundary itself (`TrainEngine.backward`); the run
    config refuses them in `extra`.
    """
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, config.deepspeed.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class SequenceBatch:
    """Right-padded (prompt + completion) token ids; `completion_mask` marks the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @classmethod
    def from_token_ids(
        cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
    ) -> SequenceBatch:
        if len(prompts) != len(completions) or not prompts:
            raise ValueError("a batch needs one prompt per completion and at least one sequence")
        width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        completion = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (prompt, done) in enumerate(zip(prompts, completions, strict=True)):
            ids[row, : len(prompt) + len(done)] = torch.tensor([*prompt, *done], dtype=torch.long)
            attention[row, : len(prompt) + len(done)] = 1
            completion[row, len(prompt) : len(prompt) + len(done)] = 1
        return cls(ids, attention, completion)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int]) -> SequenceBatch:
        index = torch.tensor(list(rows), dtype=torch.long)
        return SequenceBatch(self.input_ids[index], self.attention_mask[index], self.completion_mask[index])

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion_mask)))


@dataclass
class TokenStats:
    """Per-token log-probs and entropies of a batch, aligned with `mask` ([B, L−1]: position i predicts i+1)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor

    def sequence_logps(self) -> torch.Tensor:
        """[B] summed log-probs of each completion."""
        return (self.logps * self.mask).sum(-1)

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1).to(self.logps.dtype)


def token_stats(
    model: torch.nn.Module, batch: SequenceBatch, *, entropy: bool = True, entropy_grad: bool = False
) -> TokenStats:
    """Forward pass → log-prob of each next token and the entropy of each next-token distribution.

    Prompt and padding positions are zero in `mask`, so they never enter a loss. The entropy keeps its
    graph only with `entropy_grad` (an entropy bonus); otherwise it is a metric and costs no memory. Frozen
    models (reference, π_old) skip it (`entropy=False`, zeros): only the policy's entropy is watched. The
    fp32 log-softmax is taken in chunks of positions (`cadence.trainer.logprobs`), never for the whole batch.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    mask = batch.completion_mask[:, 1:]
    grad = entropy_grad and torch.is_grad_enabled()
    logps, entropies = selective_stats(logits, batch.input_ids[:, 1:], mask, entropy=entropy, entropy_grad=grad)
    return TokenStats(logps, entropies, mask.to(logps.dtype))


class TrainEngine:
    """The policy under training plus frozen copies: the reference and (GRPO) the old policy."""

    def __init__(self, model_dir: Path | str, config: RunConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.config, self.schedule = config, Schedule.of(config)
        self.world_size = ensure_dist_env()
        self.rank = int(os.environ["RANK"])
        cuda = torch.cuda.is_available()
        bf16 = config.deepspeed.bf16 if config.deepspeed.bf16 is not None else cuda
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.pad_token_id = int(model.config.pad_token_id or 0)
        self.reference = _frozen(copy.deepcopy(model), dtype)
        self.old_policy = _frozen(copy.deepcopy(model), dtype) if self.schedule.needs_old_policy else None
        self._init_optimizer_and_engine(model, bf16)
        self.reference.to(self.device)
        if self.old_policy is not None:
            self.old_policy.to(self.device)

    def _init_optimizer_and_engine(self, model: torch.nn.Module, bf16: bool) -> None:
        opt = self.config.optimizer
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
        warmup = max(opt.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        if deepspeed is None:
            if self.world_size > 1:
                raise ConfigError("multi-process training needs DeepSpeed: pip install 'cadence[trainer]'")
            log.warning("DeepSpeed is not importable; training with plain torch (single process)")
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.module = model.to(self.device, torch.bfloat16 if bf16 else torch.float32)
            self.engine, self.optimizer, self.scheduler = self.module, optimizer, scheduler
            return
        _skip_shm_op()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(self.config, bf16)
        )
        if self.world_size == 1 and self.config.deepspeed.zero_stage == 0:
            # Alone there is nothing to average, but DeepSpeed still flattens every gradient into buckets
            # for an all-reduce (~1 s per step for SmolLM2-135M on CPU).
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        self.device = self.engine.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group together (*collective*): a rank that exits while its peers' gloo threads
        still run aborts with "terminate called without an active exception"."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.world_size > 1:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # -- forward / backward ------------------------------------------------------------------------------

    def policy_stats(self, batch: SequenceBatch, *, entropy_grad: bool = False) -> TokenStats:
        """Token stats under the policy, with gradients."""
        self.engine.train()
        return token_stats(self.engine, batch.to(self.device), entropy_grad=entropy_grad)

    @torch.no_grad()
    def reference_stats(self, batch: SequenceBatch) -> TokenStats:
        return token_stats(self.reference, batch.to(self.device), entropy=False)

    @torch.no_grad()
    def old_policy_stats(self, batch: SequenceBatch) -> TokenStats:
        """Token stats under the snapshot of the last weight sync (GRPO's π_old)."""
        model = self.old_policy if self.old_policy is not None else self.reference
        return token_stats(model, batch.to(self.device), entropy=False)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate one micro-batch's gradients (*collective* under ZeRO ≥ 2: every rank runs as many).

        The micro-batch count varies from step to step (micro-batches are sized in tokens), so instead of
        DeepSpeed's fixed `gradient_accumulation_steps` the caller says which backward is the `last` of the
        step (DeepSpeed's `set_gradient_accumulation_boundary`: gradients are reduced across ranks there)
        and scales each micro-batch's loss by the whole step's normaliser itself.
        """
        if deepspeed is None:
            loss.backward()
            return
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip, optimizer and scheduler step on the accumulated gradients (*collective*). Returns the
        global grad norm.

        The policy's gradient buffers outlive the step, zeroed in place, as ZeRO ≥ 1 keeps its flat ones:
        freed and reallocated every step they would be allocated during the first micro-batch's backward
        and held through every later forward, so a step's peak would depend on its micro-batch count
        (the benchmark in services/trainer/README.md, "Memory"), and freeing them leaves the heap in pieces.
        """
        if deepspeed is None:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.optimizer.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=False)
            return float(norm)
        norm = None
        kept = []
        if self.config.deepspeed.zero_stage == 0:  # DeepSpeed records the norm only for ZeRO ≥ 1
            kept = [(p, p.grad) for p in self.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in kept]))
        self.engine.step()
        if not self.engine.bfloat16_enabled():  # bf16 keeps its fp32 gradients in DeepSpeed's own buffers
            for param, grad in kept:  # DeepSpeed's ZeRO-0 step drops them (`param.grad = None`)
                param.grad = grad.zero_()
        norm = norm if norm is not None else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- weights -----------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full weights on every rank, as CPU tensors (*collective*: gathers ZeRO-3 shards)."""
        params = list(self.module.parameters())
        if deepspeed is not None and self.config.deepspeed.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def sync_reference(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Copy the policy into the reference model (*collective* when `state_dict` is not given)."""
        self.reference.load_state_dict(state_dict if state_dict is not None else self.full_state_dict())

    def sync_old_policy(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Copy the policy into the old-policy snapshot, if one is kept (*collective* without a state dict)."""
        if self.old_policy is not None:
            self.old_policy.load_state_dict(state_dict if state_dict is not None else self.full_state_dict())

    def save_pretrained(self, out_dir: Path, tokenizer: Any) -> None:
        """Save the policy as an HF model directory that `from_pretrained` loads (*collective*)."""
        state = self.full_state_dict()
        if self.is_main:
            model = copy.deepcopy(self.reference).to(torch.float32)
            model.load_state_dict(state)
            model.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Policy, optimizer, scheduler and `client_state` (DeepSpeed format), plus the frozen models
        (*collective*). The tag becomes the `latest` one only once everything is written."""
        frozen = {"reference": self.reference.state_dict()}
        if self.old_policy is not None:
            frozen["old_policy"] = self.old_policy.state_dict()
        if deepspeed is None:
            (directory / tag).mkdir(parents=True, exist_ok=True)
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            state |= {"scheduler": self.scheduler.state_dict(), "client_state": client_state}
            torch.save(state, directory / tag / "state.pt")
            torch.save(frozen, directory / tag / FROZEN_FILE)
            (directory / "latest").write_text(tag)
            return
        if self.is_main:
            (directory / tag).mkdir(parents=True, exist_ok=True)
            torch.save(frozen, directory / tag / FROZEN_FILE)
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: Path) -> dict[str, Any] | None:
        """Restore the latest checkpoint under `directory`; its client state, or None when there is none."""
        latest = directory / "latest"
        if not latest.exists():
            return None
        tag = latest.read_text().strip()
        if deepspeed is None:
            state = torch.load(directory / tag / "state.pt", weights_only=False)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            client_state = state["client_state"]
        else:
            _, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        frozen = torch.load(directory / tag / FROZEN_FILE, weights_only=True)
        self.reference.load_state_dict(frozen["reference"])
        if self.old_policy is not None and "old_policy" in frozen:
            self.old_policy.load_state_dict(frozen["old_policy"])
        log.info("resumed from checkpoint %s", directory / tag)
        return client_state


def _frozen(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
