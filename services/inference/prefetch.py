"""Fetch each version as the broker announces it, so a sync at s = 1 starts before the prompts arrive.

At s = 1 the worker's next prompts are enqueued only after the trainer's publish returns, and the worker
syncs once it has read them; the broker announces the version on `Watch` as soon as it is stored. Fetching
on the announcement overlaps the fetch with the publish's reply, the enqueue and the read of the prompts
instead of starting after them. What is fetched ahead is fetched exactly as a sync would (whole, every chunk
and the whole version sha256-verified), so nothing about what may be loaded changes.

One fetch at a time, under one lock that also covers reading its tensors (`fetched`): a fetch with
`apply_deltas` writes into the buffer the previous fetch's tensors view, so nothing is fetched ahead while
the worker still loads from the last one, and a fetch ahead that fails leaves nothing to take.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from cadence.clients.broker import WeightTransport
from cadence.logging import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)


class Prefetcher:
    """Fetches the newest announced version ahead on a daemon thread; `fetched(v)` hands it over (or fetches)."""

    def __init__(self, weights: WeightTransport, loaded: int) -> None:
        self.weights = weights
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # held by a fetch and while its tensors are read
        self._announced = loaded
        self._done = loaded  # the newest version fetched (ahead or on demand) or loaded
        self._ahead: tuple[int, dict[str, torch.Tensor]] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="weights-prefetch", daemon=True)
        self._thread.start()

    def announce(self, version: int) -> None:
        """A version is published (the watch saw it): fetch it ahead unless it is already in hand."""
        with self._cond:
            self._announced = max(self._announced, version)
            self._cond.notify_all()

    @contextmanager
    def fetched(self, version: int) -> Iterator[dict[str, torch.Tensor]]:
        """Version `version` whole and verified: the one fetched ahead, else fetched now. No fetch runs until
        the block ends, so its tensors (views into the fetch buffer) stay intact while they are loaded."""
        with self._lock:
            with self._cond:
                ahead, self._ahead = self._ahead, None
                self._done = max(self._done, version)
            yield ahead[1] if ahead is not None and ahead[0] == version else self.weights.fetch(version)

    def close(self) -> None:
        """Stop fetching ahead (a fetch in flight ends when the transport closes)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._announced <= self._done:
                    self._cond.wait()
                if self._closed:
                    return
                version = self._announced
            with self._lock:
                with self._cond:
                    if self._closed or version <= self._done:
                        continue
                    self._done, self._ahead = version, None  # the buffer the old one views is rewritten now
                try:
                    tensors = self.weights.fetch(version)
                except Exception as error:  # the sync fetches it itself, with the client's retries
                    log.warning("fetching version %d ahead failed (%s); the sync will fetch it", version, error)
                    continue
                with self._cond:
                    self._ahead = (version, tensors)
