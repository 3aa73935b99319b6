"""HTTP front of the reward service (FastAPI): native, OpenRLHF- and slime-compatible scoring, health, metrics.

Transport only: every endpoint converts its request to `scoring.Item`s, calls the shared `Scorer`, and
converts back. One handler maps `cadence.errors` to status codes; malformed JSON and wrong types give 422
with the field path; bodies over the limit give 413; saturation gives 429 with `Retry-After`.
"""

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictFloat, StrictInt, StrictStr, Tag
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cadence.errors import CadenceError, InvalidRequest, Overloaded, TooLarge, Unauthenticated
from cadence.logging import get_logger
from cadence.metrics import CONTENT_TYPE_LATEST, metrics_text
from cadence.reward import metrics
from cadence.reward.auth import ApiKeys
from cadence.reward.scoring import Item, Limits, Result, Scorer
from cadence.reward.verifier import REASONS

log = get_logger(__name__)


class ScoreResultOut(BaseModel):
    reward: float
    reason: str = Field(description="correct | incorrect | no_answer | timeout | error (math); scored (chat)")
    task: str
    scorer_version: str


class ScoreReply(BaseModel):
    results: list[ScoreResultOut] = Field(description="Same order as the request's items.")


class OpenRLHFReply(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(description="Per reason, 1.0 for the samples with that reason.")


class SlimeReply(BaseModel):
    reward: float
    reason: str


NON_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
"""A gold answer must hold more than whitespace (the scorer strips it). Spelled out instead of `\\S`: the
schema's regex dialect (ECMAScript) and the server's (pydantic's Rust regex) and `str.strip` disagree on what
whitespace is (U+0085 is whitespace to Python and Rust, not to ECMAScript, so a client generated from the
schema sent a label the server refused); this class is the union of the three."""
MATH_NEEDS_A_LABEL = {"if": {"required": ["task"], "properties": {"task": {"const": "math"}}}}


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app, with the limits its scorer enforces written into their schema."""

    score: type[BaseModel]
    openrlhf: type[BaseModel]
    slime: type[BaseModel]


def request_models(limits: Limits, tasks: list[str]) -> RequestModels:
    """Request models stating `limits` (item counts, string lengths) and the rules of the tasks served.

    A math item needs a non-blank reference; a chat item exists in the schema only when a reward model is
    loaded. One rule JSON Schema cannot state is said in the descriptions: `prompts` and `labels` of
    /get_reward have one entry per query. Bodies over the byte limit get 413 before any parsing."""
    Task = Literal[tuple(tasks)]
    Prompt = Annotated[StrictStr, Field(max_length=limits.max_prompt_chars)]
    Response = Annotated[StrictStr, Field(max_length=limits.max_response_chars)]
    Reference = Annotated[StrictStr, Field(max_length=limits.max_reference_chars, pattern=NON_BLANK)]
    Label = Reference | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]
    counts: dict[str, Any] = {"min_length": 1, "max_length": limits.max_items}

    class MathItem(BaseModel):
        prompt: Prompt = ""
        response: Response
        reference: Reference = Field(description="Gold answer (non-blank).")
        task: Literal["math"] = "math"

    class ChatItem(BaseModel):
        prompt: Prompt = ""
        response: Response
        reference: Annotated[StrictStr, Field(max_length=limits.max_reference_chars)] = ""
        task: Literal["chat"]

    kinds = [Annotated[MathItem, Tag("math")]] + ([Annotated[ChatItem, Tag("chat")]] if "chat" in tasks else [])
    ScoreItemIn = Annotated[Union[tuple(kinds)], Discriminator(_task_of)]  # noqa: UP007

    class ScoreRequest(BaseModel):
        items: list[ScoreItemIn] = Field(**counts)

    chat_note = "" if "chat" in tasks else " (this instance has no reward model: labels are required)"

    class OpenRLHFRequest(BaseModel):
        model_config = ConfigDict(extra="allow", json_schema_extra=_needs(["labels"], "chat" not in tasks))
        query: list[Response] = Field(description="Prompt and response as one string, per sample.", **counts)
        prompts: Annotated[list[Prompt], Field(**counts)] | None = Field(
            None, description="The prompt of each query (stripped from it); one per query."
        )
        labels: Annotated[list[Label], Field(**counts)] | None = Field(
            None, description=f"Gold answers, one per query; given → task 'math', else 'chat'{chat_note}."
        )
        task: Task | None = None

    class SlimeRequest(BaseModel):
        model_config = ConfigDict(extra="allow", json_schema_extra=_needs(["label"], "chat" not in tasks))
        prompt: Prompt = ""
        response: Response
        label: Label | None = None
        task: Task | None = Field(None, description=f"Default: 'math' when a label is given, else 'chat'{chat_note}.")

    return RequestModels(ScoreRequest, OpenRLHFRequest, SlimeRequest)


def _task_of(item: Any) -> str:
    task = item.get("task", "math") if isinstance(item, dict) else getattr(item, "task", "math")
    return task if task in ("math", "chat") else "math"


def _needs(fields: list[str], always: bool) -> dict[str, Any]:
    """JSON Schema for "these fields are given (not null) when task is math, or always with no reward model"."""
    rule = {"required": fields, "properties": {field: {"not": {"type": "null"}} for field in fields}}
    return {"allOf": [rule]} if always else {**MATH_NEEDS_A_LABEL, "then": rule}


def _field_path(loc: tuple[Any, ...]) -> str:
    """`items[1].reference` from pydantic's loc (less `body`, and the item-kind tag after an index)."""
    path = ""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    parts = [p for i, p in enumerate(parts) if not (p in ("math", "chat") and i and isinstance(parts[i - 1], int))]
    for part in parts:
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
    models = request_models(scorer.limits, ["math"] + (["chat"] if scorer.reward_model else []))
    ScoreRequest, OpenRLHFRequest, SlimeRequest = models.score, models.openrlhf, models.slime

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


def _openrlhf_items(request: Any) -> list[Item]:
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
