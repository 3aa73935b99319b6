"""Typed client of the reward service's HTTP API, sync (`RewardClient`) and async (`AsyncRewardClient`).

Each call has one deadline (`timeout` seconds, retries included). 429 (honouring `Retry-After`), 5xx and
connection failures are retried with exponential backoff; other failures raise the matching
`cadence.errors` type with the service's message (which says how to fix the request).

    with RewardClient("http://127.0.0.1:8000", api_key="...") as client:
        client.score([ScoreItem(response="... \\boxed{4}", reference="4")])[0].reward   # 1.0
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cadence.errors import (
    CadenceError,
    InvalidRequest,
    NotReady,
    Overloaded,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
)
from cadence.retry import Backoff, Retry, aretry, retry

if TYPE_CHECKING:
    import httpx

_ERRORS: dict[int, type[CadenceError]] = {
    401: Unauthenticated,
    403: PermissionDenied,
    413: TooLarge,
    422: InvalidRequest,
    429: Overloaded,
    503: NotReady,
}
_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class ScoreItem:
    """One thing to score; `reference` (the gold answer) is required for `math`."""

    response: str
    reference: str = ""
    prompt: str = ""
    task: str = "math"


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    reason: str
    task: str
    scorer_version: str


def _error(response: httpx.Response) -> CadenceError:
    try:
        message = response.json().get("message") or response.text
    except ValueError:
        message = response.text
    cls = _ERRORS.get(response.status_code, CadenceError)
    if cls is Overloaded:
        return Overloaded(f"HTTP 429: {message}", retry_after=_retry_after(response, 1.0))
    return cls(f"HTTP {response.status_code}: {message}")


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


class _Again(Exception):
    """A failure worth another attempt; `wait_at_least` is the server's `Retry-After` (429) or 0."""

    def __init__(self, failure: CadenceError, wait_at_least: float = 0.0) -> None:
        super().__init__(str(failure))
        self.failure, self.wait_at_least = failure, wait_at_least


class _Policy:
    """The retry policy of both clients: `retries` retries, doubling from `backoff`, within one `timeout`."""

    def __init__(self, timeout: float, retries: int, backoff: float) -> None:
        self.timeout, self.retries, self.backoff = timeout, retries, Backoff(backoff)

    def loop(self) -> tuple[Retry, float]:
        """A fresh retry loop for one call, and the call's deadline."""
        deadline = time.monotonic() + self.timeout
        return Retry(self.backoff, attempts=self.retries, deadline=deadline), deadline


def _reply(response: httpx.Response) -> dict[str, Any]:
    """The decoded reply; raises the typed error, wrapped in `_Again` when the status is worth a retry."""
    if response.status_code < 400:
        return response.json()
    failure = _error(response)
    if response.status_code not in _RETRY_STATUS:
        raise failure
    raise _Again(failure, _retry_after(response, 0.0) if response.status_code == 429 else 0.0)


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _wait_at_least(error: BaseException) -> float:
    return error.wait_at_least if isinstance(error, _Again) else 0.0


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _results(body: dict[str, Any]) -> list[ScoreResult]:
    return [ScoreResult(**result) for result in body["results"]]


class _Client:
    """What both clients share: the connection pool (`httpx.<_pool>`) and the retry policy."""

    _pool = "Client"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.25,
    ) -> None:
        import httpx

        self._httpx = httpx
        self._policy = _Policy(timeout, retries, backoff)
        self._client = getattr(httpx, self._pool)(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def _unreachable(self, error: Exception) -> _Again:
        return _Again(NotReady(f"reward service unreachable at {self._client.base_url}: {error!r}"))


class RewardClient(_Client):
    """Blocking client; thread-safe (one connection pool)."""

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Results in the order of `items`."""
        return _results(self.post("/v1/score", {"items": [asdict(item) for item in items]}))

    def ready(self) -> bool:
        try:
            return self._client.get("/readyz", timeout=5.0).status_code == 200
        except self._httpx.HTTPError:
            return False

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with the retry policy; the decoded reply, or the typed error."""
        loop, deadline = self._policy.loop()

        def attempt() -> dict[str, Any]:
            try:
                return _reply(self._client.post(path, json=payload, timeout=_remaining(deadline)))
            except self._httpx.TransportError as error:
                raise self._unreachable(error) from error

        try:
            return retry(attempt, loop, retry_on=_Again, at_least=_wait_at_least)
        except _Again as again:
            raise again.failure from again.__cause__

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncRewardClient(_Client):
    """The asyncio twin of `RewardClient`."""

    _pool = "AsyncClient"

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        return _results(await self.post("/v1/score", {"items": [asdict(item) for item in items]}))

    async def ready(self) -> bool:
        try:
            return (await self._client.get("/readyz", timeout=5.0)).status_code == 200
        except self._httpx.HTTPError:
            return False

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        loop, deadline = self._policy.loop()

        async def attempt() -> dict[str, Any]:
            try:
                return _reply(await self._client.post(path, json=payload, timeout=_remaining(deadline)))
            except self._httpx.TransportError as error:
                raise self._unreachable(error) from error

        try:
            return await aretry(attempt, loop, retry_on=_Again, at_least=_wait_at_least)
        except _Again as again:
            raise again.failure from again.__cause__

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
