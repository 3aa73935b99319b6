"""Supervisor fault hooks: a child killed with SIGKILL restarts with the same arguments and environment."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from cadence.app.supervisor import Supervisor

SCRIPT = "import os, sys, time; print(os.environ['MARK'], sys.argv[1], os.getpid(), flush=True); time.sleep(60)"


def test_kill_then_restart_keeps_args_env_and_log(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path, env={"MARK": "shared"})
    child = supervisor.start("sleeper", [sys.executable, "-c", SCRIPT, "arg1"], env={"MARK": "own"})
    try:
        with pytest.raises(RuntimeError, match="still running"):
            supervisor.restart("sleeper")
        first = child.proc.pid
        _wait_for_lines(child.log_path, 1)
        supervisor.kill("sleeper")
        assert child.returncode == -signal.SIGKILL
        assert supervisor.first_failure() is child
        supervisor.restart("sleeper")
        assert child.alive and child.proc.pid != first and supervisor.first_failure() is None
        lines = _wait_for_lines(child.log_path, 2)
        assert [line.split()[:2] for line in lines] == [["own", "arg1"], ["own", "arg1"]]
        supervisor.kill("sleeper", signal.SIGSTOP)
        assert child.alive  # frozen, not dead
        supervisor.kill("sleeper", signal.SIGCONT)
    finally:
        supervisor.stop_all(grace=2)
    assert not child.alive
    with pytest.raises(KeyError, match="no child named"):
        supervisor.restart("nobody")


def _wait_for_lines(path: Path, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines()
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines")


def test_children_do_not_inherit_distributed_rendezvous_variables(tmp_path, monkeypatch) -> None:
    """An in-process trainer sets MASTER_PORT & co.; a child trainer inheriting them would bind that port."""
    import sys

    from cadence.app.supervisor import Supervisor

    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "3")
    supervisor = Supervisor(tmp_path / "logs", env={"CADENCE_RUN_ID": "r"})
    script = "import os; print(os.environ.get('MASTER_PORT'), os.environ.get('RANK'), os.environ['CADENCE_RUN_ID'])"
    child = supervisor.start("probe", [sys.executable, "-c", script])
    assert child.proc is not None and child.proc.wait(timeout=30) == 0
    assert child.log_path.read_text().split() == ["None", "None", "r"]
