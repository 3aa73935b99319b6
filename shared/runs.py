"""Runs submitted to an already running docker-compose fleet (`cadence run --attach`).

On Kubernetes the chart's trainer always starts from its run ConfigMap (`cadence k8s submit`), never from
this queue: one submission path per deployment.

A submission is the run's config in its metadata hash plus its id on a queue. A trainer started without
`--config` takes the next submission and marks it active; inference and reward workers started without
a run id serve whichever run is active. Local runs (`cadence run`) skip all this: they start their own
services with the run id set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

from cadence.config import RunConfig, dump_run_config, parse_run_config
from cadence.errors import Conflict
from cadence.logging import get_logger
from cadence.streams import meta_key, read_meta, retrying, write_meta

log = get_logger(__name__)

SUBMISSIONS_KEY = "cadence:submissions"
ACTIVE_RUN_KEY = "cadence:active_run"


def submit(client: redis.Redis, config: RunConfig) -> str:
    """Queue `config` for the fleet's trainer; refuse a run id that already has metadata."""
    run_id = config.run_id
    if retrying(lambda: client.exists(meta_key(run_id)), "check run id"):
        raise Conflict(f"run {run_id!r} already exists in this Redis; pick another run_id")
    write_meta(client, run_id, {"config": dump_run_config(config), "state": "submitted", "submitted_unix": time.time()})
    retrying(lambda: client.rpush(SUBMISSIONS_KEY, run_id), "queue submission")
    return run_id


def claim_next(client: redis.Redis, timeout_seconds: float = 0) -> RunConfig | None:
    """Take the oldest submission (waiting up to `timeout_seconds`, 0 = forever) and make it the active run."""
    popped = retrying(lambda: client.blpop([SUBMISSIONS_KEY], timeout=timeout_seconds), "wait for a submission")
    if popped is None:
        return None
    run_id = popped[1].decode()
    meta = read_meta(client, run_id)
    config = parse_run_config(_yaml(meta.get("config", "")), f"submission {run_id}")
    write_meta(client, run_id, {"state": "claimed"})
    retrying(lambda: client.set(ACTIVE_RUN_KEY, run_id), "set active run")
    return config


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


def active_run(client: redis.Redis) -> str | None:
    value = retrying(lambda: client.get(ACTIVE_RUN_KEY), "read active run")
    return value.decode() if value else None


def wait_for_active_run(client: redis.Redis, poll_seconds: float = 1.0, timeout_seconds: float | None = None) -> str:
    """Block until some run is active; return its id."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while True:
        run_id = active_run(client)
        if run_id:
            return run_id
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no active run after {timeout_seconds}s; submit one with `cadence run --attach`")
        time.sleep(poll_seconds)


def follow_active_runs(
    client: redis.Redis,
    serve_run: Callable[[str, threading.Event], None],
    stop: threading.Event,
    poll_seconds: float = 2.0,
) -> None:
    """Serve whichever run is active, switching when another run becomes active.

    `serve_run(run_id, run_stop)` works on one run until `run_stop` is set; it is started for the active
    run, stopped when the active run changes or `stop` is set, and its exception (if any) is re-raised.
    """
    while not stop.is_set():
        run_id = active_run(client)
        if not run_id:
            stop.wait(poll_seconds)
            continue
        log.info("serving run %s", run_id)
        run_stop = threading.Event()
        failure: list[BaseException] = []

        def target(
            run_id: str = run_id, run_stop: threading.Event = run_stop, failure: list[BaseException] = failure
        ) -> None:
            try:
                serve_run(run_id, run_stop)
            except BaseException as error:
                failure.append(error)

        thread = threading.Thread(target=target, name=f"run-{run_id}", daemon=True)
        thread.start()
        while not stop.is_set() and thread.is_alive() and active_run(client) == run_id:
            stop.wait(poll_seconds)
        run_stop.set()
        thread.join()
        if failure:
            raise failure[0]
