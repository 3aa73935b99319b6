"""Submitting runs to a running fleet through Redis."""

import pytest

from cadence import runs, streams
from cadence.config import parse_run_config
from cadence.errors import Conflict


def test_submit_claim_activate(redis_url: str) -> None:
    client = streams.connect(redis_url)
    config = parse_run_config({"run_id": "exp1", "sync_every": 4, "steps": 9})
    assert runs.active_run(client) is None
    assert runs.submit(client, config) == "exp1"
    with pytest.raises(Conflict, match="already exists"):
        runs.submit(client, config)
    claimed = runs.claim_next(client, timeout_seconds=1)
    assert claimed is not None and claimed.steps == 9 and claimed.sync_every == 4
    assert runs.active_run(client) == "exp1"
    assert runs.wait_for_active_run(client, timeout_seconds=1) == "exp1"
    assert streams.read_meta(client, "exp1")["state"] == "claimed"
    assert runs.claim_next(client, timeout_seconds=0.1) is None


def test_waiting_without_a_run_says_how_to_submit(redis_url: str) -> None:
    with pytest.raises(TimeoutError, match="cadence run --attach"):
        runs.wait_for_active_run(streams.connect(redis_url), poll_seconds=0.05, timeout_seconds=0.1)


def test_cli_attach_submits_to_the_fleet(redis_url: str) -> None:
    from pathlib import Path

    from typer.testing import CliRunner

    from cadence.app.cli import app

    config = Path(__file__).resolve().parents[3] / "configs" / "toy-online-dpo.yaml"
    result = CliRunner().invoke(app, ["run", str(config), "--attach"], env={"CADENCE_REDIS_URL": redis_url})
    assert result.exit_code == 0, result.output
    claimed = runs.claim_next(streams.connect(redis_url), timeout_seconds=1)
    assert claimed is not None and claimed.run_id.startswith("toy-online-dpo-")


def test_cli_attach_without_redis_url_says_what_to_set() -> None:
    from pathlib import Path

    from typer.testing import CliRunner

    from cadence.app.cli import app
    from cadence.errors import ConfigError

    config = Path(__file__).resolve().parents[3] / "configs" / "toy-online-dpo.yaml"
    result = CliRunner().invoke(app, ["run", str(config), "--attach"], env={"CADENCE_REDIS_URL": ""})
    assert isinstance(result.exception, ConfigError) or "CADENCE_REDIS_URL" in result.output


def test_follow_switches_to_the_newly_active_run(redis_url: str) -> None:
    import threading
    import time

    client = streams.connect(redis_url)
    served: list[str] = []
    stopped: list[str] = []

    def serve_run(run_id: str, run_stop: threading.Event) -> None:
        served.append(run_id)
        run_stop.wait()
        stopped.append(run_id)

    stop = threading.Event()
    follower = threading.Thread(target=runs.follow_active_runs, args=(client, serve_run, stop, 0.05))
    follower.start()
    for run_id in ("first", "second"):
        runs.submit(client, parse_run_config({"run_id": run_id}))
        runs.claim_next(client, timeout_seconds=1)
        deadline = time.monotonic() + 5
        while run_id not in served and time.monotonic() < deadline:
            time.sleep(0.02)
    stop.set()
    follower.join(5)
    assert served == ["first", "second"] and stopped == ["first", "second"]


def test_follow_reraises_a_crash(redis_url: str) -> None:
    import threading

    client = streams.connect(redis_url)
    runs.submit(client, parse_run_config({"run_id": "boom"}))
    runs.claim_next(client, timeout_seconds=1)

    def serve_run(run_id: str, run_stop: threading.Event) -> None:
        raise RuntimeError(f"worker for {run_id} crashed")

    with pytest.raises(RuntimeError, match="worker for boom crashed"):
        runs.follow_active_runs(client, serve_run, threading.Event(), 0.05)
