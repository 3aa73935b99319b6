"""The generation engine interface: the `Engine` ABC and its types (sampling params, samples, generations).

The transformers engine is in `hf_engine.py`, the vLLM engine in `vllm_engine.py`; `factory.py` builds one by
kind.

An engine turns a batch of prompts (plain text, or chat messages rendered with the model's chat template)
into `n` samples each — text, token ids, per-token logprobs, finish reason — and swaps its weights in place
(`load_weights`). Both engines report *raw* logprobs: log-softmax of the model's logits before temperature,
top-p or top-k, i.e. what a plain forward pass of the same weights gives the trainer.

Every generate call returns the policy version that produced it. A readers–writer lock makes that exact:
generate calls run side by side, `load_weights` waits for them to finish and holds new ones back, so no
sample ever mixes two versions. This module is pure: no gRPC, no Redis.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cadence.chat import PromptInput, prompt_token_ids
from cadence.errors import BroadcastFailed, InvalidRequest, NotReady, TooLarge

if TYPE_CHECKING:
    import torch

    from cadence.v1 import common_pb2

MAX_N = 64
MAX_PROMPTS = 1024
ENCODED_KEPT = 2 * MAX_PROMPTS
"""Prompts whose token ids an engine keeps: the rollout worker checks each prompt of a batch (`prepare`),
then generates the batch, and a chat template costs about 0.15 ms a prompt to render on the toy."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample (mirrors `cadence.v1.SamplingParams`); hashable so a worker can group prompts by it."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: no top-k cut."""
    max_tokens: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> SamplingParams:
        """Proto defaults (0) mean: n 1, top_p 1.0, top_k off, unseeded; max_tokens 0 means 64.

        Floats are proto float32: rounding to 6 digits gives back the value the sender wrote (0.6, not
        0.6000000238).
        """
        return cls(
            n=pb.n or 1,
            temperature=round(pb.temperature, 6),
            top_p=round(pb.top_p, 6) or 1.0,
            top_k=0 if pb.top_k in (0, -1) else pb.top_k,
            max_tokens=pb.max_tokens or 64,
            seed=pb.seed or None,
            stop=tuple(pb.stop),
        )

    def validate(self) -> None:
        """Raise `InvalidRequest` naming the field and the allowed range."""
        checks = [
            (1 <= self.n <= MAX_N, f"sampling.n must be in 1..{MAX_N}, got {self.n}"),
            (0.0 <= self.temperature <= 10.0, f"sampling.temperature must be in 0..10, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_tokens >= 1, f"sampling.max_tokens must be >= 1, got {self.max_tokens}"),
            (len(self.stop) <= 8 and all(self.stop), "sampling.stop takes at most 8 non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


@dataclass
class Sample:
    """One completion: `logprobs[i]` is the raw logprob of `token_ids[i]` under the generating weights."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""

    def to_pb(self) -> common_pb2.Sample:
        from cadence.v1 import common_pb2

        return common_pb2.Sample(
            text=self.text, token_ids=self.token_ids, logprobs=self.logprobs, finish_reason=self.finish_reason
        )


def prompt_input(prompt: common_pb2.Prompt) -> PromptInput:
    """A `cadence.v1.Prompt` as engine input: its chat messages when it has any, else its text."""
    if prompt.messages:
        return [{"role": message.role, "content": message.content} for message in prompt.messages]
    return prompt.text


@dataclass
class Completion:
    """The `n` samples of one prompt and the prompt's token ids."""

    samples: list[Sample]
    prompt_token_ids: list[int]


@dataclass
class Generation:
    """One generate call's completions (one per prompt, in order) and the version that produced all of them."""

    completions: list[Completion]
    policy_version: int
    seconds: float = field(default=0.0)


class _ReadersWriterLock:
    """Many readers (generate) or one writer (load_weights); a waiting writer holds new readers back."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Engine(ABC):
    """Generate with the loaded weights; load new weights in place. Subclasses implement `_generate`/`_load`."""

    kind: str = ""

    def __init__(self, model_path: str | Path, *, version: int = 0) -> None:
        from transformers import AutoTokenizer

        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._version = version
        self._lock = _ReadersWriterLock()
        self._encoded: dict[str | tuple, list[int]] = {}

    @property
    def version(self) -> int:
        """The policy version of the loaded weights (0: the seed model; -1: a load failed midway)."""
        return self._version

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine takes, in tokens."""

    def encode(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt: messages through the model's chat template (`cadence.chat`), text as is.
        The last `ENCODED_KEPT` prompts' ids are kept, so a prompt checked and then generated renders once."""
        key = prompt if isinstance(prompt, str) else tuple(tuple(sorted(message.items())) for message in prompt)
        ids = self._encoded.get(key)
        if ids is None:
            ids = prompt_token_ids(self.tokenizer, prompt)
            if len(self._encoded) >= ENCODED_KEPT:
                self._encoded.clear()
            self._encoded[key] = ids
        return list(ids)

    def prepare(self, prompt: PromptInput, params: SamplingParams) -> list[int]:
        """Token ids of one prompt, or `InvalidRequest` when it cannot be generated with `params`."""
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise TooLarge(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                f"{self.max_model_len}-token context; shorten the prompt or lower max_tokens"
            )
        return ids

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams) -> Generation:
        """`params.n` samples for each prompt, all from one version of the weights."""
        import time

        params.validate()
        if len(prompts) > MAX_PROMPTS:
            raise TooLarge(f"{len(prompts)} prompts in one call; send at most {MAX_PROMPTS}")
        token_ids = [self.prepare(prompt, params) for prompt in prompts]
        with self._lock.read():
            if self._version < 0:
                raise NotReady("a weight update failed midway; generation resumes after the next successful sync")
            started = time.perf_counter()
            samples = self._generate(token_ids, params) if token_ids else []
            version = self._version
            seconds = time.perf_counter() - started
        completions = [Completion(s, ids) for s, ids in zip(samples, token_ids, strict=True)]
        return Generation(completions, version, seconds)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights in place with `tensors` (HF checkpoint names) and tag them `version`.

        Names and shapes are checked before the model is touched (`InvalidRequest`, version unchanged). Any
        other failure may leave unknown weights: the version becomes -1 and `generate` refuses until a
        later load succeeds.
        """
        self._replace_weights(lambda: self._load(tensors), version)

    def _replace_weights(self, load: Callable[[], None], version: int) -> None:
        """Run `load` with generation held back, then tag the weights `version`. A failure that leaves the model
        as it was (`InvalidRequest`, `BroadcastFailed`) keeps the version; any other sets it to -1."""
        with self._lock.write():
            previous, self._version = self._version, -1
            try:
                load()
            except (InvalidRequest, BroadcastFailed):
                self._version = previous
                raise
            self._version = version

    def close(self) -> None:  # noqa: B027 - engines without processes have nothing to release
        """Release the engine's processes and memory."""

    @abstractmethod
    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """`params.n` samples per tokenized prompt."""

    @abstractmethod
    def _load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the named tensors into the running model."""
