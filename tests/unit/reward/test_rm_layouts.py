"""Reward models as they ship: tiny checkpoints saved in each published layout, scored by `RewardModel` and
compared with a forward computed by hand (the bare `LlamaModel` on the unpadded sequence, then the head).

Layouts: Skywork-Reward-V2 style (`LlamaForSequenceClassification`, one label, `score.weight`), the same
without a pad token (pads with EOS; the toy template ends every answer in EOS), and Athene-RM style
(config `CustomAutoModelForSequenceClassification`, weights `model.*` + `v_head.weight`, CLS token appended).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cadence.models.tiny import save_untrained_rm, save_untrained_tiny, tiny_config
from cadence.models.tokenizer import build_tokenizer
from cadence.reward.reward_model import RewardModel
from cadence.reward.rm_layouts import RewardModelLayoutError, describe, detect_kind

ATHENE_CLS = "<|reserved_special_token_1|>"
PAIRS = [("What is 1+2?", " \\boxed{3}"), ("What is 10+20?", " it is 30" * 3), ("What is 5+5?", " 10")]


def _save_athene(out_dir: Path, *, architectures: list[str] | None, seed: int = 0) -> Path:
    """Athene-RM's files: a Llama backbone under `model.`, a bias-free `v_head`, a tokenizer with a CLS token."""
    from transformers import LlamaModel

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"cls_token": ATHENE_CLS})
    config = tiny_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    weights = {f"model.{name}": value for name, value in LlamaModel(config).state_dict().items()}
    weights["v_head.weight"] = torch.randn(1, config.hidden_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    described = json.loads((out_dir / "config.json").read_text())
    described.pop("architectures", None)
    if architectures:
        described["architectures"] = architectures
    (out_dir / "config.json").write_text(json.dumps(described))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _save_without_pad(out_dir: Path) -> Path:
    """A sequence classifier whose tokenizer and config have no pad token (as many Llama RMs ship)."""
    save_untrained_rm(out_dir, seed=1)
    config = json.loads((out_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (out_dir / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out_dir


def _by_hand(model_dir: Path, head: str, ids: list[int], position: int) -> float:
    """The backbone alone on one unpadded sequence, its last hidden state (normed) at `position`, times the head."""
    from transformers import AutoConfig, LlamaModel

    weights = load_file(str(model_dir / "model.safetensors"))
    backbone = LlamaModel(AutoConfig.from_pretrained(model_dir))
    backbone.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    with torch.inference_mode():
        hidden = backbone(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, position]
    return float(hidden @ weights[f"{head}.weight"][0])


@pytest.fixture(scope="module")
def athene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return _save_athene(tmp_path_factory.mktemp("athene"), architectures=["CustomAutoModelForSequenceClassification"])


def test_athene_scores_at_the_cls_token_appended_after_the_template(athene_dir: Path) -> None:
    from transformers import AutoTokenizer

    rm = RewardModel(str(athene_dir), device="cpu", max_batch_tokens=4096)
    assert rm.kind == "athene"
    tokenizer = AutoTokenizer.from_pretrained(athene_dir)
    scores = rm.score(PAIRS)
    for (prompt, response), score in zip(PAIRS, scores, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        # The model card's preprocess: template text + cls_token, tokenized with the tokenizer's defaults.
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False) + tokenizer.cls_token)["input_ids"]
        assert ids[-1] == tokenizer.convert_tokens_to_ids(ATHENE_CLS)
        assert score == pytest.approx(_by_hand(athene_dir, "v_head", ids, len(ids) - 1), abs=1e-4)
    assert len(set(scores)) == len(scores)


def test_athene_is_recognised_by_its_weight_names_alone(tmp_path: Path) -> None:
    model_dir = _save_athene(tmp_path / "athene", architectures=None)
    assert detect_kind(*describe(model_dir)) == "athene"


def test_a_stock_sequence_classifier_scores_at_the_last_token(random_rm_dir: Path) -> None:
    rm = RewardModel(str(random_rm_dir), device="cpu", max_batch_tokens=4096)
    assert rm.kind == "sequence-classification"
    for (prompt, response), score in zip(PAIRS, rm.score(PAIRS), strict=True):
        ids = rm.tokenizer(rm.render(prompt, response), add_special_tokens=False)["input_ids"]
        assert score == pytest.approx(_by_hand(random_rm_dir, "score", ids, len(ids) - 1), abs=1e-4)


def test_no_pad_token_and_a_template_ending_in_eos_scores_the_eos_token(tmp_path: Path) -> None:
    """Padding with EOS must not make the last real token (EOS here) look like padding."""
    model_dir = _save_without_pad(tmp_path / "no-pad")
    rm = RewardModel(str(model_dir), device="cpu", max_batch_tokens=4096)
    for (prompt, response), score in zip(PAIRS, rm.score(PAIRS), strict=True):
        ids = rm.tokenizer(rm.render(prompt, response), add_special_tokens=False)["input_ids"]
        assert ids[-1] == rm.tokenizer.eos_token_id
        assert score == pytest.approx(_by_hand(model_dir, "score", ids, len(ids) - 1), abs=1e-4)


def test_an_athene_checkpoint_loaded_as_a_classifier_names_the_weights(athene_dir: Path) -> None:
    with pytest.raises(RewardModelLayoutError, match=r"freshly initialised \['score.weight'\].*unused \['v_head"):
        RewardModel(str(athene_dir), device="cpu", kind="sequence-classification")


def test_a_model_without_a_scoring_head_is_refused(tmp_path: Path) -> None:
    model_dir = save_untrained_tiny(tmp_path / "lm")
    with pytest.raises(RewardModelLayoutError, match="cannot tell the reward-model layout"):
        RewardModel(str(model_dir), device="cpu")
    with pytest.raises(RewardModelLayoutError, match=r"freshly initialised \['score.weight'\]"):
        RewardModel(str(model_dir), device="cpu", kind="sequence-classification")
