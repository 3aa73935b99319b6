"""Fetching announced versions ahead (`cadence.inference.prefetch`) against a real broker on loopback: the
version is fetched once, handed over whole and bit exact, never rewritten while it is being loaded, and a
failed fetch ahead leaves the sync to fetch it itself."""

from __future__ import annotations

import threading
import time

import torch

from cadence.clients import BrokerClient
from cadence.inference.prefetch import Prefetcher

RUN = "run-p"


def version(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(300_000, generator=gen), "b": torch.randn(1000, generator=gen).to(torch.bfloat16)}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_announced_version_is_fetched_once_ahead_and_handed_over(broker: str) -> None:
    with BrokerClient(broker, RUN) as trainer, BrokerClient(broker, RUN, apply_deltas=True) as replica:
        trainer.publish(version(1), 1)
        prefetch = Prefetcher(replica, loaded=0)
        prefetch.announce(1)
        wait_until(lambda: trainer.status().bytes_out > 0 and prefetch._ahead is not None)
        sent = trainer.status().bytes_out
        with prefetch.fetched(1) as tensors:
            assert same(tensors, version(1))
        assert trainer.status().bytes_out == sent  # taken from the fetch ahead, not fetched again
        prefetch.close()


def test_nothing_is_fetched_ahead_while_the_last_version_is_being_loaded(broker: str) -> None:
    """With `apply_deltas` a fetch rewrites the buffer the last one's tensors view: the next version waits
    until the block that reads them ends."""
    with BrokerClient(broker, RUN) as trainer, BrokerClient(broker, RUN, apply_deltas=True) as replica:
        trainer.publish(version(1), 1)
        prefetch = Prefetcher(replica, loaded=0)
        with prefetch.fetched(1) as tensors:
            trainer.publish(version(2), 2)
            prefetch.announce(2)
            time.sleep(0.5)  # a fetch ahead now would overwrite `tensors` in place
            assert same(tensors, version(1))
        wait_until(lambda: prefetch._ahead is not None)
        with prefetch.fetched(2) as tensors:
            assert same(tensors, version(2))
        prefetch.close()


def test_a_failed_fetch_ahead_leaves_the_sync_to_fetch_it(broker: str) -> None:
    with BrokerClient(broker, RUN) as trainer, BrokerClient(broker, RUN, retries=0) as replica:
        prefetch = Prefetcher(replica, loaded=0)
        prefetch.announce(3)  # not published yet: the fetch ahead fails (VersionNotFound)
        wait_until(lambda: not prefetch._lock.locked() and prefetch._done == 3)
        assert prefetch._ahead is None
        trainer.publish(version(3), 3)
        with prefetch.fetched(3) as tensors:
            assert same(tensors, version(3))
        prefetch.close()


def test_a_sync_waits_for_the_fetch_ahead_of_its_version_instead_of_fetching_twice(broker: str) -> None:
    with BrokerClient(broker, RUN) as trainer, BrokerClient(broker, RUN) as replica:
        trainer.publish(version(4), 4)
        prefetch = Prefetcher(replica, loaded=0)
        started = threading.Event()
        real_fetch = replica.fetch

        def slow_fetch(v: int) -> dict[str, torch.Tensor]:
            started.set()
            time.sleep(0.3)
            return real_fetch(v)

        replica.fetch = slow_fetch  # type: ignore[method-assign]
        prefetch.announce(4)
        assert started.wait(5)
        with prefetch.fetched(4) as tensors:
            assert same(tensors, version(4))
        assert trainer.status().bytes_out == trainer.latest().total_bytes  # one fetch in all
        prefetch.close()
