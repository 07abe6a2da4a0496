"""The upstream HTTP client of the frontend: one request to a vLLM instance's OpenAI server.

Owns the wire of the frontend's HTTP workers (``vllm serve`` with the fabric connector, found in
etcd with an ``http`` endpoint and a ``VllmLayout``): the request bodies, the SSE
parsing, the prefill -> decode two-step and the mapping of upstream failures to HTTP statuses.
It knows nothing of routing or of the frontend's streams (``http_connection`` does).

One request, ``generate``::

    [source given]  POST source/v1/completions  {prompt: ids, max_tokens: 1, stream: false,
                                                  kv_transfer_params: {do_remote_decode: true}}
                    ──▶ its response's kv_transfer_params  (failure: fall back, see below)
    POST serving/v1/completions  {prompt: ids, stream: true, return_token_ids: true,
                                  kv_transfer_params: <from the source> | absent}
    ──▶ one ``TokenChunk`` per SSE event carrying tokens; the one with ``finish_reason`` is the
        last (``finished``), with the request's statistics.

Sampling: ``temperature``, ``top_p`` and ``seed`` are forwarded; a request without
``temperature`` is sent ``temperature: 0`` (greedy, as the fabric's own workers decode).

Failures (``UpstreamError``: status + message, for OpenAI's error JSON): an instance that cannot
be reached is 503; an upstream 401 (no or a wrong ``FABRIC_UPSTREAM_API_KEY_FILE``) is 500 with
its message; no response within the read timeout is 504; an upstream 400/422 (a prompt
the instance refuses) is 400 with its message; any other upstream status, an SSE error event, a
malformed body or a stream that ends without ``finish_reason`` is 500. A failed prefill step is
not fatal unless the instance refused the request itself (400): the serving instance computes
the prompt itself, and the last chunk's statistics say so (``prefill_worker: ""``,
``fallback``). Cancelling the coroutine closes the upstream connection, which makes vLLM abort
the request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from fabric.discovery.records import EngineKind, WorkerRecord
from fabric.errors import FabricError
from fabric.frontend.api_key import ApiKey
from fabric.signal.messages import GenerateRequest, TokenChunk

logger = logging.getLogger(__name__)

Scalar = float | int | str | bool
HTTP_ENGINES = frozenset({EngineKind.VLLM})
"""Engines whose workers are served over HTTP instead of the fabric's signals."""
_COMPLETIONS = "/v1/completions"
_SAMPLING_KEYS = ("temperature", "top_p", "seed")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Timeouts (seconds) and the key of upstream requests.

    Attributes:
        connect_timeout_s: to open a connection (and to send the body).
        read_timeout_s: between two reads of a response: the whole prefill response, or the
            next SSE event of a stream. The frontend's own idle timeout also applies.
        api_key: sent as ``Authorization: Bearer`` on every request (the instances'
            ``--api-key``; ``FABRIC_UPSTREAM_API_KEY_FILE``, ``api_key``).
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0
    api_key: ApiKey | None = None

    def headers(self) -> dict[str, str]:
        """The headers every upstream request carries."""
        return {} if self.api_key is None else {"Authorization": self.api_key.authorization()}

    def timeout(self) -> httpx.Timeout:
        connect = self.connect_timeout_s
        return httpx.Timeout(connect=connect, read=self.read_timeout_s, write=connect, pool=connect)


class UpstreamError(FabricError):
    """An upstream request failed; ``status`` is the HTTP status the frontend answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def uses_http(record: WorkerRecord) -> bool:
    """Whether the frontend talks to this worker over HTTP (a vLLM instance)."""
    return record.layout.engine in HTTP_ENGINES


def base_url(record: WorkerRecord) -> str:
    """The worker's OpenAI server; UpstreamError (503) when its record names none."""
    url = record.endpoints.http
    if url is None:
        raise UpstreamError(503, f"worker {record.worker_id} publishes no http endpoint")
    return url.rstrip("/")


def completion_body(
    record: WorkerRecord, request: GenerateRequest, **fields: Any
) -> dict[str, Any]:
    """The ``/v1/completions`` body of ``request`` for ``record`` (module docstring)."""
    body: dict[str, Any] = {
        "model": record.layout.model,
        "prompt": list(request.token_ids),
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
    }
    body.update({k: request.sampling[k] for k in _SAMPLING_KEYS if k in request.sampling})
    body.update(fields)
    return body


async def generate(
    client: httpx.AsyncClient,
    serving: WorkerRecord,
    request: GenerateRequest,
    source: WorkerRecord | None,
) -> AsyncIterator[TokenChunk]:
    """The request's chunks from ``serving``, its prompt's KV prefilled on ``source`` if given.

    Raises:
        UpstreamError: see the module docstring.
    """
    stats: dict[str, Scalar] = {"engine": "vllm"}
    kv_transfer_params: dict[str, Any] | None = None
    if source is not None:
        started = time.monotonic()
        try:
            kv_transfer_params = await prefill(client, source, request)
        except UpstreamError as exc:
            if exc.status == 400:
                raise
            logger.warning(
                "%s: prefill on %s failed (%s); %s computes the prompt",
                request.request_id,
                source.worker_id,
                exc.message,
                serving.worker_id,
            )
            stats["prefill_worker"] = ""
            stats["fallback"] = f"prefill on {source.worker_id} failed: {exc.message}"
        else:
            stats["prefill_ms"] = round((time.monotonic() - started) * 1e3, 3)
            stats["kv_transfer_tokens"] = int(kv_transfer_params.get("remote_num_tokens") or 0)
    fields: dict[str, Any] = {"stream": True, "return_token_ids": True}
    if kv_transfer_params is not None:
        fields["kv_transfer_params"] = kv_transfer_params
    body = completion_body(serving, request, **fields)
    async for chunk in _stream(client, serving, request.request_id, body, stats):
        yield chunk


async def prefill(
    client: httpx.AsyncClient, source: WorkerRecord, request: GenerateRequest
) -> dict[str, Any]:
    """Prefill the prompt on ``source``; the ``kv_transfer_params`` its response names."""
    body = completion_body(
        source,
        request,
        max_tokens=1,
        stream=False,
        kv_transfer_params={"do_remote_decode": True},
    )
    url = base_url(source) + _COMPLETIONS
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise _transport_error(source, exc) from exc
    if response.status_code != 200:
        raise _status_error(source, response.status_code, response.text)
    try:
        params = response.json().get("kv_transfer_params")
    except (ValueError, AttributeError) as exc:
        raise UpstreamError(500, f"worker {source.worker_id}: the response is not JSON") from exc
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise UpstreamError(
            500,
            f"worker {source.worker_id} returned no kv_transfer_params to decode from: is it a "
            "kv_producer with etcd_endpoints (docs/vllm.md)?",
        )
    return params


async def _stream(
    client: httpx.AsyncClient,
    serving: WorkerRecord,
    request_id: str,
    body: Mapping[str, Any],
    stats: dict[str, Scalar],
) -> AsyncIterator[TokenChunk]:
    url = base_url(serving) + _COMPLETIONS
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise _status_error(serving, response.status_code, text)
            async for event in _sse_data(response):
                chunk = _chunk(serving, request_id, event, stats)
                if chunk is not None:
                    yield chunk
                    if chunk.finished:
                        return
    except httpx.HTTPError as exc:
        raise _transport_error(serving, exc) from exc
    raise UpstreamError(500, f"worker {serving.worker_id} ended the stream without a finish_reason")


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of an SSE response, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield data


def _chunk(
    serving: WorkerRecord, request_id: str, data: str, stats: dict[str, Scalar]
) -> TokenChunk | None:
    """One SSE event as a ``TokenChunk`` (None: an event without tokens or end)."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise UpstreamError(500, f"worker {serving.worker_id} sent a malformed event") from exc
    if not isinstance(event, dict):
        raise UpstreamError(500, f"worker {serving.worker_id} sent a malformed event")
    if "error" in event:
        raise UpstreamError(500, f"worker {serving.worker_id}: {_error_message(event)}")
    choices = event.get("choices") or []
    if not choices:
        return None  # a usage-only event
    choice = choices[0]
    token_ids = choice.get("token_ids") or []
    finish_reason = choice.get("finish_reason") or ""
    if not token_ids and not finish_reason:
        return None
    if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
        raise UpstreamError(500, f"worker {serving.worker_id} sent malformed token ids")
    return TokenChunk(
        request_id,
        token_ids,
        bool(finish_reason),
        str(finish_reason),
        dict(stats) if finish_reason else {},
    )


def _error_message(body: object) -> str:
    """The message of an OpenAI (or vLLM) error body, else the body itself, shortened."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(message := error.get("message"), str):
            return message
        if isinstance(error, str):
            return error
    return str(body)[:500]


def _status_error(record: WorkerRecord, status: int, text: str) -> UpstreamError:
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text[:500] or f"HTTP {status}"
    if status in (400, 422):
        return UpstreamError(400, f"worker {record.worker_id} refused the request: {message}")
    return UpstreamError(500, f"worker {record.worker_id} answered HTTP {status}: {message}")


def _transport_error(record: WorkerRecord, exc: httpx.HTTPError) -> UpstreamError:
    url = record.endpoints.http or "?"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamError(503, f"worker {record.worker_id} at {url} is unreachable: {exc!r}")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, f"worker {record.worker_id} at {url} timed out: {exc!r}")
    return UpstreamError(503, f"connection to worker {record.worker_id} at {url} broke: {exc!r}")
