"""`HFEngine`: transformers `generate` on CPU or one GPU — the reference engine and the fallback where vLLM
cannot run. It reports raw logprobs (log-softmax of the logits before temperature, top-p or top-k)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.errors import InvalidRequest
from cadence.inference.engine import Engine, Sample, SamplingParams

if TYPE_CHECKING:
    import torch


class HFEngine(Engine):
    """transformers `generate` on CPU or one GPU: the reference engine and the fallback where vLLM cannot run."""

    kind = "hf"

    def __init__(self, model_path: str | Path, *, version: int = 0, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(model_path, version=version)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()
        self.device = device
        self._eos = _eos_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else min(self._eos)
        # Seeding uses torch's global RNG, so generate calls take turns.
        self._mutex = threading.Lock()
        self._prompt_width = 0

    @property
    def max_model_len(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        import torch

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        with self._mutex, torch.inference_mode():
            self._prompt_width = width
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                **self._generate_kwargs(params),
            )
        generated = out.sequences[:, width:]
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        chosen = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1).tolist()
        rows = [self._sample(tokens, lps, params) for tokens, lps in zip(generated.tolist(), chosen, strict=True)]
        if params.temperature == 0:  # greedy: one row per prompt stands for all n identical samples
            return [[row] * params.n for row in rows]
        return [rows[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        sampling = params.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "num_return_sequences": params.n if sampling else 1,
            "do_sample": sampling,
            "temperature": params.temperature if sampling else None,
            "top_p": params.top_p if sampling else None,
            "top_k": params.top_k if sampling else None,
            "pad_token_id": self._pad,
            "eos_token_id": sorted(self._eos),
            "return_dict_in_generate": True,
            "output_logits": True,
        }
        if params.stop:
            kwargs["stopping_criteria"] = [_stop_strings_criterion(self.tokenizer, params.stop, self._prompt_width)]
        return kwargs

    def _sample(self, tokens: list[int], logprobs: list[float], params: SamplingParams) -> Sample:
        """Cut one generated row at a stop string (dropped from the text) or at EOS (kept, as vLLM does)."""
        end = next((i + 1 for i, token in enumerate(tokens) if token in self._eos), len(tokens))
        tokens, logprobs = tokens[:end], logprobs[:end]
        text = self._decode(tokens)
        hits = [text.find(stop) for stop in params.stop if stop in text]
        if not hits:
            reason = "stop" if tokens and tokens[-1] in self._eos else "length"
            return Sample(text, tokens, logprobs, reason)
        # Keep the shortest token prefix whose text contains a stop string (bisection over decodes).
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if any(stop in self._decode(tokens[:mid]) for stop in params.stop):
                high = mid
            else:
                low = mid + 1
        return Sample(text[: min(hits)], tokens[:low], logprobs[:low], "stop")

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()
        given = list(tensors)
        if not given:
            raise InvalidRequest("no weights given: a weight update needs at least one tensor")
        for name, tensor in given:
            if name not in state:
                raise InvalidRequest(f"weight {name!r} is not a parameter of {self.model_path}; wrong model?")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise InvalidRequest(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(state[name].shape)}"
                )
        for name, tensor in given:
            state[name].copy_(tensor)


def _stop_strings_criterion(tokenizer: Any, stops: tuple[str, ...], prompt_width: int) -> Any:
    """Stop a row once its generated text contains a stop string.

    transformers' own `stop_strings` assumes a BPE vocabulary with a word-start marker and refuses others
    (e.g. the toy character tokenizer), so the generated tail is decoded directly.
    """
    import torch
    from transformers import StoppingCriteria

    window = max(len(stop) for stop in stops) + 8

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            tails = tokenizer.batch_decode(
                input_ids[:, max(prompt_width, input_ids.shape[1] - window) :], skip_special_tokens=True
            )
            return torch.tensor([any(stop in tail for stop in stops) for tail in tails], device=input_ids.device)

    return StopOnStrings()


def _eos_ids(*candidates: int | list[int] | None) -> set[int]:
    ids: set[int] = set()
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    return ids
