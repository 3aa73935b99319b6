"""Reward model: a checkpoint in one of the layouts `rm_layouts` knows, scoring (prompt, response) pairs.

The layout (stock sequence classifier, or Athene's value head at a CLS token) comes from the checkpoint's
own description or an explicit `kind`. Inputs are rendered with the tokenizer's chat template when it has
one (a user turn, then an assistant turn), else as prompt + response; Athene appends its CLS token. Batches
are formed by a token budget (padded tokens per forward pass), longest first, so a few long answers never
blow up memory. Sequences longer than the model's context are cut on the left: the end of the response
(and Athene's CLS token) is what gets scored; Athene's own usage code cuts on the right and then finds no
CLS token, so only inputs that fit are scored as it scores them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from cadence.models.registry import resolve_model
from cadence.reward.rm_layouts import HEADS, RewardModelLayoutError, load_scoring_model, score_positions


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RewardModel:
    """A loaded reward model. Thread-safe: forward passes are serialised by a lock."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str = "auto",
        max_batch_tokens: int = 16384,
        max_length: int | None = None,
        kind: str = "auto",
    ) -> None:
        from transformers import AutoTokenizer

        source = resolve_model(name_or_path)
        self.name = Path(source).name if isinstance(source, Path) else str(source)
        self.version = f"rm:{self.name}"
        self.device = _pick_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model, self.kind = load_scoring_model(source, kind, dtype)
        self.model = model.to(self.device).eval()
        self.cls_token_id: int | None = None
        if self.kind == "athene":
            if self.tokenizer.cls_token is None:
                raise RewardModelLayoutError(
                    f"{source}: an Athene-style RM needs its tokenizer's cls_token; it has none"
                )
            self.cls_token_id = self.tokenizer.cls_token_id
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None)]
        limits.append(self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**6 else None)
        self.max_length = min(limit for limit in limits if limit) if any(limits) else 4096
        self.max_batch_tokens = max(max_batch_tokens, self.max_length)
        self._lock = threading.Lock()

    def render(self, prompt: str, response: str) -> str:
        """The text the model sees for one pair."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            return text + self.tokenizer.cls_token if self.kind == "athene" else text
        return prompt + response

    def encode(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids per pair. Special tokens come from the chat template when there is one, except for Athene,
        whose published usage tokenizes the rendered text with the tokenizer's defaults (so Llama-3 gets BOS
        from the tokenizer and again from the template: that is what Athene-RM was served with)."""
        texts = [self.render(prompt, response) for prompt, response in pairs]
        special = not self.tokenizer.chat_template or self.kind == "athene"
        encoded = self.tokenizer(texts, add_special_tokens=special, truncation=True, max_length=self.max_length)
        return encoded["input_ids"]

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped longest first so that batch size × longest length ≤ `max_batch_tokens`."""
        order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
        groups: list[list[int]] = []
        for index in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.max_batch_tokens:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    def forward(self, ids: list[list[int]]) -> list[float]:
        """Scores of already-encoded sequences, one padded forward pass: the head at each row's scoring position
        (`rm_layouts.score_positions`), on the backbone's final (normed) hidden states."""
        padded: Any = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        attention_mask = padded["attention_mask"].to(self.device)
        positions = score_positions(self.kind, input_ids, attention_mask, self.cls_token_id)
        backbone = getattr(self.model, self.model.base_model_prefix)
        head = getattr(self.model, HEADS[self.kind])
        with torch.inference_mode():
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            scores = head(hidden[torch.arange(len(ids), device=self.device), positions])
        return scores[:, 0].float().cpu().tolist()

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """One score per (prompt, response), in order; higher is better."""
        if not pairs:
            return []
        ids = self.encode(pairs)
        scores = [0.0] * len(ids)
        with self._lock:
            for group in self.batches([len(seq) for seq in ids]):
                for index, value in zip(group, self.forward([ids[i] for i in group]), strict=True):
                    scores[index] = value
        return scores
