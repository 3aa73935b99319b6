"""HTTP front of the reward service (FastAPI): native, OpenRLHF- and slime-compatible scoring, health, metrics.

Transport only: every endpoint converts its request to `scoring.Item`s, calls the shared `Scorer`, and
converts back. One handler maps `cadence.errors` to status codes; malformed JSON and wrong types give 422
with the field path; bodies over the limit give 413; saturation gives 429 with `Retry-After`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadence.errors import CadenceError, InvalidRequest, Overloaded, TooLarge, Unauthenticated
from cadence.logging import get_logger
from cadence.metrics import CONTENT_TYPE_LATEST, metrics_text
from cadence.reward import metrics
from cadence.reward.auth import ApiKeys
from cadence.reward.scoring import Item, Result, Scorer
from cadence.reward.verifier import REASONS

log = get_logger(__name__)
Task = Literal["math", "chat"]
Label = StrictStr | StrictInt | StrictFloat | None


class ScoreItemIn(BaseModel):
    prompt: StrictStr = ""
    response: StrictStr
    reference: StrictStr = Field("", description="Gold answer; required for task 'math'.")
    task: Task = "math"


class ScoreRequest(BaseModel):
    items: list[ScoreItemIn]


class ScoreResultOut(BaseModel):
    reward: float
    reason: str = Field(description="correct | incorrect | no_answer | timeout | error (math); scored (chat)")
    task: str
    scorer_version: str


class ScoreReply(BaseModel):
    results: list[ScoreResultOut] = Field(description="Same order as the request's items.")


class OpenRLHFRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    query: list[StrictStr] = Field(description="Prompt and response as one string, per sample.")
    prompts: list[StrictStr] | None = Field(None, description="The prompt of each query (stripped from it).")
    labels: list[Label] | None = Field(None, description="Gold answers; given → task 'math', else 'chat'.")
    task: Task | None = None


class OpenRLHFReply(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(description="Per reason, 1.0 for the samples with that reason.")


class SlimeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: StrictStr = ""
    response: StrictStr
    label: Label = None
    task: Task | None = Field(None, description="Default: 'math' when a label is given, else 'chat'.")


class SlimeReply(BaseModel):
    reward: float
    reason: str


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def _error_response(error: CadenceError, details: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": type(error).__name__, "message": str(error)}
    if details:
        body["details"] = details
    headers = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=error.http_status, headers=headers)


class BodyLimit:
    """Reads at most `max_bytes` of a request body; more gets 413 before any parsing happens."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = TooLarge(f"request body exceeds {self.max_bytes} bytes; send smaller batches")
        await _error_response(error)(scope, receive, send)


class RequestLimit:
    """At most `max_requests` scoring requests inside the service at once, those waiting for a worker thread
    included; beyond it 429 at once. The scorer's item admission cannot see requests queued before they reach
    it, so without this a flood of small requests would queue without bound (and latency with it)."""

    def __init__(self, app: ASGIApp, max_requests: int, paths: frozenset[str]) -> None:
        self.app, self.max_requests, self.paths = app, max_requests, paths
        self.active = 0  # the event loop is one thread: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_requests:
            error = Overloaded(
                f"{self.active} scoring requests in progress (limit {self.max_requests}); retry after 1s",
                retry_after=1.0,
            )
            await _error_response(error)(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


SCORING_PATHS = frozenset({"/v1/score", "/get_reward", "/v1/reward"})


def create_app(
    scorer: Scorer, keys: ApiKeys | None = None, *, max_body_bytes: int = 32 << 20, max_requests: int = 64
) -> FastAPI:
    """The FastAPI app over `scorer`; `keys` (optional) protect the scoring endpoints."""
    keys = keys or ApiKeys()
    app = FastAPI(
        title="Cadence reward service",
        version="1",
        description="Math answers checked by math-verify, chat responses scored by a reward model.",
    )
    app.state.draining = False
    app.state.keys = keys
    _install_error_handlers(app)
    app.add_middleware(RequestLimit, max_requests=max_requests, paths=SCORING_PATHS)
    _install_metrics_middleware(app)
    guarded = [Depends(_authorize)]

    @app.post("/v1/score", dependencies=guarded, tags=["scoring"])
    def score(request: ScoreRequest) -> ScoreReply:
        """Native batch scoring; items may mix tasks."""
        items = [Item(i.prompt, i.response, i.reference, i.task) for i in request.items]
        return ScoreReply(results=[ScoreResultOut(**vars(r)) for r in _score(scorer, items)])

    @app.post("/get_reward", dependencies=guarded, tags=["compatible"])
    def get_reward(request: OpenRLHFRequest) -> OpenRLHFReply:
        """OpenRLHF remote reward model (`--remote_rm_url`): query = prompt + response."""
        results = _score(scorer, _openrlhf_items(request))
        rewards = [r.reward for r in results]
        logs = {f"reason_{name}": [float(r.reason == name) for r in results] for name in (*REASONS, "scored")}
        return OpenRLHFReply(rewards=rewards, scores=rewards, extra_logs={k: v for k, v in logs.items() if any(v)})

    @app.post("/v1/reward", dependencies=guarded, tags=["compatible"])
    def slime_reward(request: SlimeRequest) -> SlimeReply:
        """slime remote reward (`--rm-type remote_rm`): one sample."""
        label = "" if request.label is None else str(request.label)
        task = request.task or ("math" if label else "chat")
        (result,) = _score(scorer, [Item(request.prompt, request.response, label, task)])
        return SlimeReply(reward=result.reward, reason=result.reason)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: scorers loaded, verifier pool alive, not draining."""
        ready = scorer.ready and not app.state.draining
        body = {"ready": ready, "tasks": scorer.tasks, "draining": app.state.draining}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"])
    def prometheus() -> Response:
        return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


_BEARER = HTTPBearer(auto_error=False, description="Required when the service is started with API keys.")


def _authorize(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
    request.app.state.keys.check_token(credentials.credentials if credentials else None)


def _score(scorer: Scorer, items: list[Item]) -> list[Result]:
    results = scorer.score(items)
    metrics.observe_items(results)
    return results


def _openrlhf_items(request: OpenRLHFRequest) -> list[Item]:
    count = len(request.query)
    for name in ("prompts", "labels"):
        given = getattr(request, name)
        if given is not None and len(given) != count:
            raise InvalidRequest(f"{name}: {len(given)} entries but query has {count}; send one per query")
    prompts = request.prompts or [""] * count
    labels = ["" if label is None else str(label) for label in (request.labels or [None] * count)]
    task = request.task or ("math" if any(labels) else "chat")
    items = []
    for query, prompt, label in zip(request.query, prompts, labels, strict=True):
        response = query[len(prompt) :] if prompt and query.startswith(prompt) else query
        items.append(Item(prompt, response, label, task))
    return items


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CadenceError)
    async def cadence_error(_: Request, error: CadenceError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"field": _field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "")} for e in error.errors()]
        first = details[0] if details else {"field": "body", "message": "invalid"}
        summary = InvalidRequest(f"{first['field']}: {first['message']}")
        return _error_response(summary, details)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = {"error": "InternalError", "message": f"internal error ({type(error).__name__}); see the service log"}
        return JSONResponse(body, status_code=500)


def _install_metrics_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.REQUESTS.labels("http", endpoint, str(response.status_code)).inc()
        metrics.LATENCY.labels("http", endpoint).observe(time.perf_counter() - started)
        return response
