"""Settings: the environment first, then the flags that were given — for the CLI and for a bare torchrun rank."""

from pathlib import Path

import pytest

from cadence.settings import from_argv, with_flags
from cadence.trainer.settings import TrainerSettings


def test_flags_override_the_environment_and_unset_flags_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_BROKER_ADDR", "broker:1")
    monkeypatch.setenv("CADENCE_RUN_DIR", "/env/runs")
    settings = with_flags(TrainerSettings, {"broker_addr": "other:2", "run_dir": None})
    assert settings.broker_addr == "other:2" and settings.run_dir == Path("/env/runs")


def test_a_rank_parses_every_field_as_a_kebab_case_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENCE_GRPC_PORT", "7")
    settings = from_argv(TrainerSettings, ["--config", "run.yaml", "--run-dir", "/r"], prog="cadence.trainer.main")
    assert (settings.config, settings.run_dir, settings.grpc_port) == (Path("run.yaml"), Path("/r"), 7)
    with pytest.raises(SystemExit) as exited:
        from_argv(TrainerSettings, ["--no-such-flag", "1"], prog="cadence.trainer.main")
    assert exited.value.code == 2
