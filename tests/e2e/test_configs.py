"""Every shipped config validates and its dry run prints the resolved plan; each is headed by how to run it."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cadence.app.cli import app

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_embedded_default_and_paper_configs_exist() -> None:
    names = {path.stem for path in CONFIGS}
    assert {"toy-semi-online-dpo", "toy-online-dpo", "toy-offline-dpo", "toy-grpo", "toy-mixed"} <= names
    assert {"numina-online-dpo", "numina-grpo", "wildchat-online-dpo", "combined-online-dpo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_dry_run(path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "algorithm" in result.output and path.stem in result.output
    assert not any(tmp_path.iterdir()), "a dry run must not create anything"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_headed_by_how_to_run_it(path: Path) -> None:
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("# ") and "Run:" in head and "Reproduces:" in head


def test_invalid_config_exits_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sync_every: 0\n")
    result = CliRunner().invoke(app, ["run", str(bad), "--dry-run"])
    assert result.exit_code != 0
    assert "sync_every" in str(result.exception) or "sync_every" in result.output


def test_an_unknown_engine_fails_before_anything_starts(tmp_path: Path) -> None:
    """`cadence run` and `cadence eval` resolve the engine kind in one place, which checks it."""
    from cadence.errors import ConfigError

    result = CliRunner().invoke(app, ["run", str(CONFIGS[0]), "--dry-run", "--engine", "vlm"])
    assert isinstance(result.exception, ConfigError) and "unknown engine 'vlm'" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path), "--engine", "vlm"])
    assert isinstance(result.exception, ConfigError) and "unknown engine 'vlm'" in str(result.exception)


def test_the_embedded_default_scores_run_on_answers_strictly(tmp_path: Path) -> None:
    """The length-collapse remedy (bench.length: no accuracy cost over 3 seeds) is on in `make run`'s config
    and shown in the plan; `--set strict_format=false` brings back lenient scoring."""
    default = next(path for path in CONFIGS if path.stem == "toy-semi-online-dpo")
    result = CliRunner().invoke(app, ["run", str(default), "--dry-run", "--runs-dir", str(tmp_path)])
    assert "math scoring   strict" in result.output, result.output
    lenient = ["run", str(default), "--dry-run", "--runs-dir", str(tmp_path), "--set", "strict_format=false"]
    assert "math scoring   lenient" in CliRunner().invoke(app, lenient).output
