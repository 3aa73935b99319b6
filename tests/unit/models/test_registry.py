"""`resolve_model`: seed names, local directories, hub ids and the error for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadence.errors import ConfigError
from cadence.models import resolve_model


def test_tiny_resolves_to_the_cached_seed(tiny_model_dir: Path) -> None:
    assert resolve_model("tiny") == tiny_model_dir


def test_directory_is_returned_as_a_path(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path


def test_hub_id_is_returned_as_a_string() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("bad", ["./missing-model", "/no/such/dir", "not a model", "tiny2"])
def test_anything_else_is_refused_with_the_choices(bad: str) -> None:
    with pytest.raises(ConfigError, match="tiny, tiny-rm, smollm2"):
        resolve_model(bad)
