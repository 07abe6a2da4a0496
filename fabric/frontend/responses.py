"""Turning a ``Generation`` into OpenAI responses: one JSON body, or server-sent events.

Owns the two response shapes (``CompletionShape`` for ``/v1/completions``, ``ChatShape`` for
``/v1/chat/completions``), the SSE stream and the race against a client that disconnects.

SSE stream (OpenAI's): ``data: <chunk JSON>\\n\\n`` per chunk that adds text (chat opens with a
``{"role": "assistant"}`` delta), the ``finish_reason`` chunk (with ``fabric``), then, when
``stream_options.include_usage``, a chunk with empty ``choices`` and ``usage``, then
``data: [DONE]``. A failure after the stream began (the HTTP status is already sent) is one
``data: {"error": ...}`` event in OpenAI's error shape, and the stream ends without ``[DONE]``.

Invariant: whatever ends a response early (client disconnect, cancellation, an error) aborts the
generation, so the worker stops and the slots are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel

from fabric.frontend.errors import ApiError
from fabric.frontend.generation import Generation, Output
from fabric.frontend.metrics import FrontendMetrics
from fabric.frontend.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Disconnected(Exception):
    """The HTTP client went away before the response was complete."""


class ResponseShape(Protocol):
    """How one endpoint's bodies look; ``created`` and ``model`` are the response's."""

    endpoint: str

    def opening(self, generation: Generation) -> list[BaseModel]: ...

    def chunk(self, generation: Generation, output: Output) -> BaseModel: ...

    def usage_chunk(self, generation: Generation) -> BaseModel: ...

    def body(self, generation: Generation, text: str) -> BaseModel: ...


def usage_of(generation: Generation) -> Usage:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class CompletionShape:
    endpoint = "completions"

    def __init__(self, model: str, created: int) -> None:
        self._model = model
        self._created = created

    def opening(self, generation: Generation) -> list[BaseModel]:
        return []

    def chunk(self, generation: Generation, output: Output) -> BaseModel:
        choice = CompletionChoice(text=output.text, finish_reason=output.finish_reason)
        return self._response(generation, [choice], final=output.finish_reason is not None)

    def usage_chunk(self, generation: Generation) -> BaseModel:
        response = self._response(generation, [], final=False)
        response.usage = usage_of(generation)
        return response

    def body(self, generation: Generation, text: str) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=generation.finish_reason)
        response = self._response(generation, [choice], final=True)
        response.usage = usage_of(generation)
        return response

    def _response(
        self, generation: Generation, choices: list[CompletionChoice], *, final: bool
    ) -> CompletionResponse:
        return CompletionResponse(
            id=generation.request_id,
            created=self._created,
            model=self._model,
            choices=choices,
            fabric=generation.fabric_info() if final else None,
        )


class ChatShape:
    endpoint = "chat"

    def __init__(self, model: str, created: int) -> None:
        self._model = model
        self._created = created

    def opening(self, generation: Generation) -> list[BaseModel]:
        delta = ChatDelta(role="assistant", content="")
        return [self._chunk(generation, [ChatChunkChoice(delta=delta)], final=False)]

    def chunk(self, generation: Generation, output: Output) -> BaseModel:
        choice = ChatChunkChoice(
            delta=ChatDelta(content=output.text), finish_reason=output.finish_reason
        )
        return self._chunk(generation, [choice], final=output.finish_reason is not None)

    def usage_chunk(self, generation: Generation) -> BaseModel:
        chunk = self._chunk(generation, [], final=False)
        chunk.usage = usage_of(generation)
        return chunk

    def body(self, generation: Generation, text: str) -> BaseModel:
        return ChatCompletionResponse(
            id=generation.request_id,
            created=self._created,
            model=self._model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text), finish_reason=generation.finish_reason
                )
            ],
            usage=usage_of(generation),
            fabric=generation.fabric_info(),
        )

    def _chunk(
        self, generation: Generation, choices: list[ChatChunkChoice], *, final: bool
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=generation.request_id,
            created=self._created,
            model=self._model,
            choices=choices,
            fabric=generation.fabric_info() if final else None,
        )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then cancel it, raise Disconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task in done:
        return task.result()
    raise Disconnected


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_text(generation: Generation, first: Output) -> str:
    """Every output's text, from ``first`` to the finished chunk."""
    pieces = [first.text]
    while (output := await generation.next()) is not None:
        pieces.append(output.text)
    return "".join(pieces)


async def sse_events(
    generation: Generation,
    first: Output,
    shape: ResponseShape,
    metrics: FrontendMetrics,
    *,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE stream of one generation (see the module docstring)."""
    try:
        for chunk in shape.opening(generation):
            yield _event(chunk)
        output: Output | None = first
        while output is not None:
            if output.text or output.finish_reason is not None:
                yield _event(shape.chunk(generation, output))
            output = await generation.next()
        if include_usage:
            yield _event(shape.usage_chunk(generation))
        yield "data: [DONE]\n\n"
    except ApiError as exc:
        metrics.errors.labels(shape.endpoint, str(exc.status)).inc()
        logger.warning("%s failed mid-stream: %s", generation.request_id, exc.message)
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        generation.abort("client disconnected")  # a no-op once the generation ended


def _event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
