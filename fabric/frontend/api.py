"""The OpenAI-compatible HTTP API (FastAPI): ``build_app(frontend)``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with
``"stream": true``), ``GET /v1/models``, ``GET /health`` (eligible workers by role; 503 while no
decode or aggregated worker is known), ``GET /metrics`` (Prometheus text), the live cluster page
``GET /dashboard`` and its JSON ``GET /v1/fabric/cluster`` (``dashboard``), an ended request's
``fabric`` field with its KV trace ``GET /v1/requests/{id}`` (``traces``), and FastAPI's
``/openapi.json`` and ``/docs``.

Both generation routes accept the ``fabric`` routing pin (``protocol``'s docstring).

With an API key (``api_key``), every ``/v1/*`` request and ``/metrics`` must carry it as
``Authorization: Bearer <key>``, else 401 before anything else is read; ``/health`` stays open.

Errors: every failure is OpenAI's error JSON (``errors.ApiError``): 400 for bad input with ``param``
naming the field (validation errors included: ``param`` is the field's path, e.g.
``messages.0.role``; a pin naming no live worker of the right role: ``fabric.worker``; a body that
is not UTF-8 JSON; a lone surrogate), 401 without the API key, 404 for another model or an unknown
route, 413 for a body or prompt over a limit (``limits``), 429 with ``Retry-After`` when this
frontend is saturated (``admission``), 500 when the worker reports an error (its message included)
or the frontend fails unexpectedly, 503 when no worker can take the request (with ``Retry-After``
when none is known), 504 when the worker sends nothing within the idle timeout or the deadline.

A request's way, cheapest checks first: body limits (``limits.BodyLimit``, before parsing),
validation, model, the prompt's length in characters or ids; then it is queued (``admission``),
tokenized on the tokenizer threads, checked in tokens, and sent once a worker has room.

A streaming response starts only after the first chunk arrived, so failures before the first
token (no worker, worker error, timeout) still get their HTTP status; later failures are an SSE
error event (``responses``). A client that disconnects at any point aborts the request: while
it is queued or tokenized it is never sent; once sent, the worker gets ``Abort`` (a decode
worker passes it on to the prefill worker computing the prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from fabric.discovery.registry import Role
from fabric.frontend.api_key import ApiKey, BearerAuth
from fabric.frontend.dashboard import add_dashboard
from fabric.frontend.errors import (
    ApiError,
    bad_request,
    internal_error,
    model_not_found,
)
from fabric.frontend.generation import Frontend, Generation, Scalar
from fabric.frontend.limits import BodyLimit, max_json_values
from fabric.frontend.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerationParams,
    Health,
    ModelCard,
    ModelList,
)
from fabric.frontend.responses import (
    ChatShape,
    CompletionShape,
    Disconnected,
    ResponseShape,
    collect_text,
    sse_events,
    unless_disconnected,
)
from fabric.frontend.router import RoutePin
from fabric.frontend.tokenizer import render_chat

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)
}
_DESCRIPTION = (
    "OpenAI-compatible frontend of KV Fabric: requests are routed to decode or aggregated "
    "workers by load, and read the prompt's KV from the worker that caches its longest prefix "
    "(a prefill worker, or a peer holding more of it than the serving worker). The optional "
    '`fabric` object pins a route: {"worker": id, "prefill_worker": id or ""}. '
    "Workers decode greedily today (temperature, top_p and seed are accepted and forwarded). "
    'Chat template: each message renders as "<role>: <content>\\n", then "assistant:". '
    "Limits: a body or prompt over this frontend's limits is a 413 naming the limit; a "
    "saturated frontend answers 429, and one without workers 503, both with Retry-After."
)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away


def build_app(frontend: Frontend, *, api_key: ApiKey | None = None) -> FastAPI:
    """The FastAPI app serving ``frontend``; the caller owns the frontend's lifecycle.

    Args:
        api_key: required of clients on ``/v1/*`` and ``/metrics`` when given (``api_key``).
    """
    app = FastAPI(title="KV Fabric frontend", version="0.1.0", description=_DESCRIPTION)
    _add_error_handlers(app, frontend)

    def refused(path: str, error: ApiError) -> None:
        endpoint = _endpoint(path)
        if endpoint is not None:
            frontend.metrics.requests.labels(endpoint).inc()
        _count(frontend, endpoint, error)

    app.add_middleware(
        BodyLimit,
        max_bytes=frontend.settings.max_body_bytes,
        max_values=max_json_values(frontend.prompt_limit.max_tokens),
        on_refused=refused,
    )
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)  # added last: runs first

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Complete a prompt (text or token ids)."""
        frontend.metrics.requests.labels("completions").inc()
        shape = CompletionShape(frontend.model_name, frontend.created)
        return await _generate(frontend, request, body, _completion_prompt(body), shape)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation, rendered with the chat template (see the description)."""
        frontend.metrics.requests.labels("chat").inc()
        text = render_chat([(message.role, message.text()) for message in body.messages])
        shape = ChatShape(frontend.model_name, frontend.created)
        return await _generate(frontend, request, body, text, shape)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        """The one model this frontend serves."""
        return ModelList(data=[ModelCard(id=frontend.model_name, created=frontend.created)])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """Workers that take new requests, by role; 503 while no decode or aggregated worker
        does (none known, or every one draining)."""
        counts = frontend.router.fleet.count_by_role()
        serving = counts[Role.DECODE] + counts[Role.AGGREGATED]
        body = Health(
            status="ok" if serving else "unavailable",
            model=frontend.model_name,
            workers={role.value: count for role, count in counts.items()},
        )
        return JSONResponse(body.model_dump(), status_code=200 if serving else 503)

    @app.get("/v1/requests/{request_id}", responses={404: {"model": ErrorResponse}})
    async def request_trace(request_id: str) -> JSONResponse:
        """An ended request's ``fabric`` field, its KV trace included (the last ones kept)."""
        info = frontend.traces.get(request_id)
        if info is None:
            raise ApiError(
                404,
                f"no ended request {request_id!r} is known here: this frontend keeps the last "
                f"{frontend.traces.capacity} ended requests (a request in flight, one served by "
                "another frontend or older ones are not shown); ids are the responses' ids",
                param="request_id",
                code="request_not_found",
            )
        return JSONResponse({"id": request_id, "fabric": info})

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics (``fabric_frontend_*``)."""
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_dashboard(app, frontend)
    return app


Prompt = str | list[int]
"""A prompt as the client gave it: text to tokenize, or token ids."""


async def _generate(
    frontend: Frontend,
    request: Request,
    body: GenerationParams,
    prompt: Prompt,
    shape: ResponseShape,
) -> Response:
    if body.model != frontend.model_name:
        raise model_not_found(body.model, frontend.model_name)
    try:
        generation = await unless_disconnected(request, _start(frontend, body, prompt, shape))
    except Disconnected:
        logger.debug("a client disconnected before its request was sent to a worker")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    streaming = False
    try:
        first = await unless_disconnected(request, generation.next())
        assert first is not None, "a generation that has not ended yields an output"
        if body.stream:
            events = sse_events(
                generation, first, shape, frontend.metrics, include_usage=body.include_usage
            )
            # The background task also covers a stream cancelled before its first iteration.
            streaming = True
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                background=BackgroundTask(_abort, generation),
            )
        text = await unless_disconnected(request, collect_text(generation, first))
        return JSONResponse(shape.body(generation, text).model_dump(mode="json"))
    except Disconnected:
        logger.debug("%s: the client disconnected", generation.request_id)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not streaming:
            generation.abort("client disconnected")  # a no-op once the generation ended


async def _start(
    frontend: Frontend, body: GenerationParams, prompt: Prompt, shape: ResponseShape
) -> Generation:
    """Check the prompt, queue the request, tokenize it and send it once a worker has room."""
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    _check_prompt(frontend, prompt, param)
    with frontend.admission.enter() as ticket:
        if isinstance(prompt, str):
            token_ids = await frontend.encode(prompt)
            frontend.prompt_limit.check_tokens(len(token_ids), param)
        else:
            token_ids = prompt
        return await frontend.start(
            ticket,
            "cmpl" if shape.endpoint == "completions" else "chatcmpl",
            token_ids,
            max_tokens=_max_tokens(frontend, body, len(token_ids)),
            sampling=_sampling(body),
            pin=_pin(body),
        )


async def _abort(generation: Generation) -> None:
    """Abort on the event loop (a sync background task would run on a worker thread)."""
    generation.abort("client disconnected")


def _completion_prompt(body: CompletionRequest) -> Prompt:
    """The one prompt of a completion request: text, ids, or a batch of one of either."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(
                f"prompt: a batch of {len(prompt)} prompts was given; send one per request",
                "prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return [token for token in prompt if isinstance(token, int)]


def _check_prompt(frontend: Frontend, prompt: Prompt, param: str) -> None:
    """The checks a prompt passes before it is tokenized: its length (413), its ids (400)."""
    if isinstance(prompt, str):
        frontend.prompt_limit.check_text(prompt, param)
        return
    frontend.prompt_limit.check_tokens(len(prompt), param)
    vocab_size = frontend.codec.vocab_size
    outside = [token for token in prompt if not 0 <= token < vocab_size]
    if outside:
        raise bad_request(
            f"{param}: token id {outside[0]} is outside the vocabulary (size {vocab_size})",
            param,
        )


def _max_tokens(frontend: Frontend, body: GenerationParams, num_prompt: int) -> int:
    """The request's ``max_tokens``, after checking prompt and answer fit the model's context."""
    is_chat = isinstance(body, ChatCompletionRequest)
    prompt_param = "messages" if is_chat else "prompt"
    max_param = "max_completion_tokens" if is_chat else "max_tokens"
    if num_prompt == 0:
        raise bad_request(f"{prompt_param}: the prompt is empty (0 tokens)", prompt_param)
    requested = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
    if requested is None:
        requested, max_param = body.max_tokens, "max_tokens"
    limit = frontend.codec.max_model_len
    if limit is not None and num_prompt >= limit:
        raise bad_request(
            f"{prompt_param}: the prompt has {num_prompt} tokens, the model's context is {limit}",
            prompt_param,
        )
    if requested is None:
        default = frontend.settings.default_max_tokens
        return default if limit is None else min(default, limit - num_prompt)
    if limit is not None and num_prompt + requested > limit:
        raise bad_request(
            f"{max_param}: {num_prompt} prompt tokens + {max_param}={requested} exceed the "
            f"model's context of {limit} tokens",
            max_param,
        )
    return requested


def _pin(body: GenerationParams) -> RoutePin | None:
    options = body.fabric
    if options is None:
        return None
    return RoutePin(worker=options.worker, prefill_worker=options.prefill_worker)


def _sampling(body: GenerationParams) -> dict[str, Scalar]:
    values = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    return {name: value for name, value in values.items() if value is not None}


def _add_error_handlers(app: FastAPI, frontend: Frontend) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(frontend, _endpoint(request.url.path), exc)
        return _response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # A validator's own ValueError (a lone surrogate...) says more than a union's
        # "not a string" for the member the value was not meant to be.
        first = next((e for e in errors if e.get("type") == "value_error"), None)
        first = first or (errors[0] if errors else {})
        if first.get("type") == "json_invalid":
            param, message = None, f"the body is not valid JSON ({first.get('msg')})"
        else:
            param = _param_path(first.get("loc", ()))
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
            others = {_param_path(error.get("loc", ())) for error in errors} - {param}
            if others:
                message += f" (also invalid: {', '.join(sorted(p or 'body' for p in others))})"
        endpoint = _endpoint(request.url.path)
        if endpoint is not None:
            frontend.metrics.requests.labels(endpoint).inc()
        error = bad_request(message, param)
        _count(frontend, endpoint, error)
        return _response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.__cause__ is not None:  # FastAPI's "error parsing the body" (not UTF-8...)
            message += f" ({exc.__cause__})"
        return _response(ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response is sent.
        error = internal_error(
            f"{request.method} {request.url.path} failed unexpectedly ({type(exc).__name__}); "
            "the frontend's log has the details"
        )
        _count(frontend, _endpoint(request.url.path), error)
        return _response(error)


def _response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _count(frontend: Frontend, endpoint: str | None, error: ApiError) -> None:
    """Count a failed request (``request_errors_total``; ``refusals_total`` for a refusal)."""
    if endpoint is not None:
        frontend.metrics.errors.labels(endpoint, str(error.status)).inc()
    if error.refusal is not None:
        frontend.metrics.refusals.labels(error.refusal.value).inc()


def _endpoint(path: str) -> str | None:
    """The ``endpoint`` label of a generation route's path; None for other paths."""
    if path.endswith("/chat/completions"):
        return "chat"
    return "completions" if path.endswith("/completions") else None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param_path(loc: Sequence[object]) -> str | None:
    """The field path of a validation error, e.g. ``messages.0.role``.

    Drops the leading ``body`` and stops at pydantic's union member tags (``str``,
    ``list[int]``, class names), which name a type, not a field.
    """
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text = str(part)
        if text in _TYPE_TAGS or "[" in text or text[:1].isupper():
            break
        parts.append(text)
    return ".".join(parts) or None
