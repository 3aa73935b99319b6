"""Reward model: any Hugging Face `AutoModelForSequenceClassification` scoring (prompt, response) pairs.

Skywork-Reward, ArmoRM, Athene-RM and `cadence seed-model tiny-rm` all have this shape: the first logit of
the last non-pad token is the score. Inputs are rendered with the tokenizer's chat template when it has
one (a user turn, then an assistant turn), else as prompt + response. Batches are formed by a token budget
(padded tokens per forward pass), longest first, so a few long answers never blow up memory. Sequences
longer than the model's context are cut on the left: the end of the response is what gets scored.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from cadence.models.registry import resolve_model


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
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

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
        self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype).to(self.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None)]
        limits.append(self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10**6 else None)
        self.max_length = min(limit for limit in limits if limit) if any(limits) else 4096
        self.max_batch_tokens = max(max_batch_tokens, self.max_length)
        self._lock = threading.Lock()

    def render(self, prompt: str, response: str) -> str:
        """The text the model sees for one pair."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + response

    def encode(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids per pair (special tokens come from the chat template when there is one)."""
        texts = [self.render(prompt, response) for prompt, response in pairs]
        special = not self.tokenizer.chat_template
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
        """Scores of already-encoded sequences, one padded forward pass."""
        padded: Any = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(
                input_ids=padded["input_ids"].to(self.device),
                attention_mask=padded["attention_mask"].to(self.device),
            ).logits
        return logits[:, 0].float().cpu().tolist()

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
