"""The transformers engine on the trained tiny seed model: shapes, logprobs, determinism, chat templates,
stop strings, bounds, and in-place weight updates tagged with exact versions."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence.errors import ConfigError, IntegrityError, InvalidRequest, NotReady, TooLarge
from cadence.inference.engine import SamplingParams, prompt_input
from cadence.inference.factory import create_engine
from cadence.inference.hf_engine import HFEngine
from cadence.v1 import common_pb2

torch.set_num_threads(1)
PROMPTS = ["What is 12+34?", "What is 5+7?", "What is 40+2?"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def seed_weights(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


def perturbed(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.05 * torch.randn(tensor.shape, generator=gen) for name, tensor in weights.items()}


def test_shapes_n_samples_and_finite_raw_logprobs(engine: HFEngine) -> None:
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=20, max_tokens=10, seed=7)
    generation = engine.generate(PROMPTS, params)
    assert generation.policy_version == 0
    assert len(generation.completions) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, generation.completions, strict=True):
        assert completion.prompt_token_ids == engine.encode(prompt)
        assert len(completion.samples) == 3
        for sample in completion.samples:
            assert 1 <= len(sample.token_ids) <= 10
            assert len(sample.logprobs) == len(sample.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in ("stop", "length")
            assert sample.finish_reason == "length" or sample.token_ids[-1] == engine.tokenizer.eos_token_id


def test_logprobs_are_the_raw_model_logprobs_of_the_sampled_tokens(engine: HFEngine) -> None:
    """Temperature 2 reshapes sampling, not the reported logprobs: they equal a plain forward pass."""
    completion = engine.generate(PROMPTS[:1], SamplingParams(temperature=2.0, max_tokens=8, seed=3)).completions[0]
    sample = completion.samples[0]
    ids = torch.tensor([completion.prompt_token_ids + sample.token_ids])
    with torch.inference_mode():
        logits = engine.model(ids).logits[0, len(completion.prompt_token_ids) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_greedy_is_deterministic_and_answers_the_toy_task(engine: HFEngine) -> None:
    first = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_tokens=14))
    second = engine.generate(PROMPTS, GREEDY)
    for a, b in zip(first.completions, second.completions, strict=True):
        assert a.samples[0].token_ids == a.samples[1].token_ids == b.samples[0].token_ids
    texts = [c.samples[0].text for c in second.completions]
    assert all("\\boxed{" in text for text in texts), texts


def test_seeded_sampling_is_reproducible(engine: HFEngine) -> None:
    params = SamplingParams(n=4, temperature=1.5, max_tokens=12, seed=11)
    run = lambda p: [[s.token_ids for s in c.samples] for c in engine.generate(PROMPTS, p).completions]  # noqa: E731
    assert run(params) == run(params)
    assert run(params) != run(SamplingParams(n=4, temperature=1.5, max_tokens=12, seed=12))


def test_chat_messages_go_through_the_chat_template(engine: HFEngine) -> None:
    messages = [{"role": "user", "content": PROMPTS[0]}]
    expected = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert engine.encode(messages) == list(expected["input_ids"])
    # The toy template renders a lone user turn as its text, so both forms must give the same answer.
    by_text = engine.generate([PROMPTS[0]], GREEDY).completions[0].samples[0]
    by_chat = engine.generate([messages], GREEDY).completions[0].samples[0]
    assert by_chat.token_ids == by_text.token_ids
    pb = common_pb2.Prompt(messages=[common_pb2.ChatMessage(role="user", content=PROMPTS[0])], text="ignored")
    assert prompt_input(pb) == messages


def test_a_prompt_checked_then_generated_renders_its_template_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollout worker `prepare`s each prompt, then generates the batch: the ids are kept, not rendered
    again; a caller changing the ids it got back changes nothing kept."""
    fresh = HFEngine(tiny_model_dir)
    rendered = []
    render = fresh.tokenizer.apply_chat_template
    monkeypatch.setattr(fresh.tokenizer, "apply_chat_template", lambda *a, **k: rendered.append(1) or render(*a, **k))
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ids = fresh.prepare(messages, GREEDY)
    ids.append(0)
    completion = fresh.generate([messages], GREEDY).completions[0]
    assert len(rendered) == 1
    assert completion.prompt_token_ids == ids[:-1] == fresh.encode(messages)
    fresh.encode([{"role": "user", "content": PROMPTS[2]}])
    assert len(rendered) == 2


def test_stop_strings_end_the_sample_and_are_cut_from_the_text(engine: HFEngine) -> None:
    full = engine.generate([PROMPTS[0]], GREEDY).completions[0].samples[0]
    stopped = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=14, stop=("{",)))
    sample = stopped.completions[0].samples[0]
    assert sample.finish_reason == "stop"
    assert sample.text == full.text[: full.text.index("{")]
    assert sample.token_ids == full.token_ids[: len(sample.token_ids)]
    assert engine.tokenizer.decode(sample.token_ids).endswith("{")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (SamplingParams(n=0), "sampling.n"),
        (SamplingParams(n=65), "sampling.n"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(engine: HFEngine, params: SamplingParams, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        engine.generate(PROMPTS[:1], params)


def test_prompts_beyond_the_context_are_refused(engine: HFEngine) -> None:
    with pytest.raises(TooLarge, match="context"):
        engine.generate(["1+" * 40], SamplingParams(max_tokens=14))
    with pytest.raises(InvalidRequest, match="text"):
        engine.generate([""], GREEDY)


def test_proto_defaults_map_to_engine_defaults() -> None:
    params = SamplingParams.from_pb(common_pb2.SamplingParams(temperature=0.6))
    assert params == SamplingParams(n=1, temperature=0.6, top_p=1.0, top_k=0, max_tokens=64, seed=None, stop=())


def test_weight_update_changes_outputs_and_restoring_gives_identical_ones(
    engine: HFEngine, seed_weights: dict[str, torch.Tensor]
) -> None:
    before = engine.generate(PROMPTS, GREEDY)
    engine.load_weights(perturbed(seed_weights, 1).items(), version=1)
    changed = engine.generate(PROMPTS, GREEDY)
    engine.load_weights(seed_weights.items(), version=2)
    restored = engine.generate(PROMPTS, GREEDY)
    tokens = lambda g: [c.samples[0].token_ids for c in g.completions]  # noqa: E731
    logprobs = lambda g: [c.samples[0].logprobs for c in g.completions]  # noqa: E731
    assert (changed.policy_version, restored.policy_version) == (1, 2)
    assert tokens(changed) != tokens(before)
    assert tokens(restored) == tokens(before)
    assert logprobs(restored) == logprobs(before)


def test_bad_weights_are_refused_and_a_half_done_load_blocks_generation(
    tiny_model_dir: Path, seed_weights: dict[str, torch.Tensor]
) -> None:
    engine = HFEngine(tiny_model_dir)
    before = engine.generate(PROMPTS, GREEDY)
    with pytest.raises(InvalidRequest, match="not a parameter"):
        engine.load_weights([("model.nonexistent", torch.zeros(1))], version=1)
    with pytest.raises(InvalidRequest, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))], version=1)
    assert engine.version == 0  # refused before the model was touched
    assert engine.generate(PROMPTS, GREEDY).completions == before.completions

    def broken_fetch() -> Iterator[tuple[str, torch.Tensor]]:
        yield next(iter(seed_weights.items()))
        raise IntegrityError("chunk 3 failed its sha256 check")

    with pytest.raises(IntegrityError):
        engine.load_weights(broken_fetch(), version=1)
    assert engine.version == -1
    with pytest.raises(NotReady, match="sync"):
        engine.generate(PROMPTS[:1], GREEDY)
    engine.load_weights(seed_weights.items(), version=3)
    assert engine.generate(PROMPTS[:1], GREEDY).policy_version == 3


def test_every_generation_is_tagged_with_the_version_that_produced_it(
    tiny_model_dir: Path, seed_weights: dict[str, torch.Tensor]
) -> None:
    """Loads race with generate calls; each result must match the reference output of its reported version."""
    engine = HFEngine(tiny_model_dir)
    variants = {0: seed_weights, 1: perturbed(seed_weights, 1)}
    reference = {}
    for parity, weights in variants.items():
        engine.load_weights(weights.items(), version=parity)
        reference[parity] = [c.samples[0].token_ids for c in engine.generate(PROMPTS, GREEDY).completions]
    assert reference[0] != reference[1]
    results, done = [], threading.Event()

    def generate() -> None:
        while not done.is_set():
            generation = engine.generate(PROMPTS, GREEDY)
            results.append((generation.policy_version, [c.samples[0].token_ids for c in generation.completions]))

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for version in range(2, 12):
        engine.load_weights(variants[version % 2].items(), version=version)
        seen = len(results)
        deadline = time.monotonic() + 10
        while len(results) < seen + 2 and time.monotonic() < deadline:  # let generations run between loads
            time.sleep(0.001)
    done.set()
    for thread in threads:
        thread.join()
    assert len({version for version, _ in results}) > 1
    for version, tokens in results:
        assert tokens == reference[version % 2], version


def test_factory_names_the_valid_kinds(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="vllm, hf"):
        create_engine("onnx", tiny_model_dir)
    assert create_engine("hf", tiny_model_dir).kind == "hf"
