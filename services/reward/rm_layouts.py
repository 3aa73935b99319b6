"""Reward-model layouts as they ship, and the one factory that loads each from the checkpoint's own description.

- `sequence-classification`: a stock one-label `*ForSequenceClassification` (Skywork-Reward-V2-Llama-3.1-8B,
  `cadence seed-model tiny-rm`): backbone `model.*` + head `score.weight` [1, hidden]. The score is the head
  applied to the last token the attention mask keeps (not the last non-pad token: a tokenizer without a pad
  token pads with EOS, and a template ending in EOS would be read one token early).
- `athene`: Nexusflow's Athene-RM (config `architectures: ["CustomAutoModelForSequenceClassification"]`, no
  modeling code on the hub): backbone `model.*` (a `LlamaModel`) + value head `v_head.weight` [1, hidden], no
  bias. Its model card's usage code renders `apply_chat_template(messages, tokenize=False)`, appends
  `tokenizer.cls_token` to the text, tokenizes it with the tokenizer's defaults (special tokens on), and
  reads `v_head(hidden_states[-1])` at the last position whose id is the CLS id (128003 for Athene-RM-8B).

`detect_kind` picks the layout from `config.json` architectures and the safetensors weight names; loading
then checks transformers' loading report, so a head that would be freshly initialised, or checkpoint
weights left unused, is a `RewardModelLayoutError` naming them, never a silently random score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cadence.errors import ConfigError

KINDS = ("sequence-classification", "athene")
ATHENE_ARCHITECTURES = frozenset({"CustomAutoModelForSequenceClassification", "AtheneForSequenceClassification"})
HEADS = {"sequence-classification": "score", "athene": "v_head"}


class RewardModelLayoutError(ConfigError):
    """A checkpoint's scoring head cannot be loaded as it was trained: unknown layout, missing or unused weights."""


def _checkpoint_file(source: str | Path, filename: str) -> Path | None:
    """A file of a local model directory or (cached) hub repository, or None when it has none."""
    if Path(source).is_dir():
        path = Path(source) / filename
        return path if path.exists() else None
    from transformers.utils import cached_file

    found = cached_file(str(source), filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def describe(source: str | Path) -> tuple[list[str], set[str]]:
    """The checkpoint's own description: `config.json` architectures and its safetensors weight names."""
    config = _checkpoint_file(source, "config.json")
    architectures = list(json.loads(config.read_text()).get("architectures") or []) if config else []
    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        return architectures, set(json.loads(index.read_text())["weight_map"])
    single = _checkpoint_file(source, "model.safetensors")
    if single is None:
        return architectures, set()
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return architectures, set(handle.keys())


def detect_kind(architectures: list[str], weight_names: set[str]) -> str:
    """`athene` or `sequence-classification` from a checkpoint's description; raises when it names neither."""
    if "v_head.weight" in weight_names or ATHENE_ARCHITECTURES & set(architectures):
        return "athene"
    if "score.weight" in weight_names or any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    heads = sorted(name for name in weight_names if not name.startswith("model.")) or ["none"]
    raise RewardModelLayoutError(
        f"cannot tell the reward-model layout: architectures {architectures or 'unset'}, weights outside the "
        f"backbone {heads[:8]}; a reward model has `score.weight` (sequence classification) or `v_head.weight` "
        f"(Athene); set the kind explicitly (CADENCE_RM_KIND: {', '.join(KINDS)}) if it has one"
    )


def _athene_class() -> type:
    """Athene-RM's published module layout (`model` = `LlamaModel`, `v_head` = Linear(hidden, 1, bias=False)).

    Only the layout is needed: `RewardModel.forward` runs the backbone and reads `v_head` at the CLS token."""
    from torch import nn
    from transformers import LlamaModel, LlamaPreTrainedModel

    class AtheneForSequenceClassification(LlamaPreTrainedModel):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.model = LlamaModel(config)
            self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

    return AtheneForSequenceClassification


def _check_loading(source: str | Path, kind: str, model: Any, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unused = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(entry[0]) for entry in info.get("mismatched_keys") or [])
    if missing or unused or mismatched:
        parts = [
            f"{label} {names[:8]}{' …' if len(names) > 8 else ''}"
            for label, names in (("freshly initialised", missing), ("unused", unused), ("wrong shape", mismatched))
            if names
        ]
        raise RewardModelLayoutError(
            f"{source} loaded as {kind!r} would score with weights not in the checkpoint: {'; '.join(parts)}; "
            f"it was trained in another layout: set the kind (CADENCE_RM_KIND: {', '.join(KINDS)}) or use a "
            "checkpoint with a trained scoring head"
        )
    head = getattr(model, HEADS[kind])
    if head.out_features != 1:
        raise RewardModelLayoutError(
            f"{source}: scoring head {HEADS[kind]} has {head.out_features} outputs; a reward model gives one score "
            "(num_labels 1)"
        )


def load_scoring_model(source: str | Path, kind: str, dtype: torch.dtype) -> tuple[Any, str]:
    """The model (backbone + scoring head) and its kind; `kind` `auto` reads the checkpoint's description."""
    if kind == "auto":
        kind = detect_kind(*describe(source))
    if kind not in KINDS:
        raise RewardModelLayoutError(f"unknown reward-model kind {kind!r}; use auto, {', '.join(KINDS)}")
    from transformers import AutoModelForSequenceClassification

    loader: Any = AutoModelForSequenceClassification if kind == "sequence-classification" else _athene_class()
    model, info = loader.from_pretrained(source, dtype=dtype, output_loading_info=True)
    _check_loading(source, kind, model, info)
    return model, kind


def score_positions(
    kind: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_id: int | None
) -> torch.Tensor:
    """Per row, the position the head is read at: the last attended token, or (Athene) the last CLS token."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    keep = attention_mask.bool() if kind == "sequence-classification" else input_ids == cls_id
    return torch.where(keep, columns, -1).max(dim=1).values
