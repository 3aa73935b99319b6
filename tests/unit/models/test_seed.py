"""The trained tiny seed (built once per cache through the session fixture) and the atomic cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cadence.models.cache import MARKER, cached_build


def test_tiny_seed_has_headroom_and_its_figures_reproduce(tiny_model_dir: Path) -> None:
    """The recorded greedy accuracy is in 20-80 % and greedy decoding of the saved model gives it again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cadence.models.toytrain import greedy_accuracy, torch_threads
    from cadence.tasks.toy import load_toy

    record = json.loads((tiny_model_dir / MARKER).read_text())
    assert 0.20 <= record["greedy_accuracy"] <= 0.80
    assert record["pass_at_8"] > record["greedy_accuracy"]  # RL needs samples that beat greedy
    assert 0 < record["sampled_accuracy"] < record["pass_at_8"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch_threads(1):
        accuracy = greedy_accuracy(model, tokenizer, load_toy("test", seed=record["seed"]))
    assert accuracy == pytest.approx(record["greedy_accuracy"], abs=0.01)


def test_cached_build_is_atomic_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_HOME", str(tmp_path))
    calls: list[Path] = []

    def failing(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_build("m", failing)
    assert list((tmp_path / "models").iterdir()) == []  # nothing that looks cached, no temp dirs left

    def good(out: Path) -> None:
        calls.append(out)
        (out / MARKER).write_text("{}")

    target = cached_build("m", good)
    assert target == tmp_path / "models" / "m" and (target / MARKER).is_file()
    assert cached_build("m", good) == target and len(calls) == 1
    assert cached_build("m", good, force=True) == target and len(calls) == 2
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]
