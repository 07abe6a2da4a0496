"""A minimal completions client for launchers and benchmarks: one streamed completion, timed.

Stdlib only (``urllib``), so a launcher needs nothing beyond the package. Reads the SSE stream of
``/v1/completions`` and keeps what a person or a benchmark wants to know: when each content chunk
arrived, the text, the token ids (when the server returns them, as vLLM does with
``return_token_ids``), the usage and the non-OpenAI ``fabric`` field (route and worker
statistics) of the final chunk. It speaks to our frontend and to any OpenAI-compatible server
(vLLM's own, in ``fabric.bench.vs_vllm``); ``extra`` carries a server's own request fields.
``complete`` is the non-streamed request (vLLM's P/D proxy sends the prefill step so). Not a
general OpenAI client: use the ``openai`` package for that.

Invariants: a ``StreamedCompletion`` is only returned for a stream that ended with ``[DONE]``
and carried content; an error chunk raises ``FabricError``; HTTP and connection errors are
``urllib.error`` exceptions, left to the caller. With ``FABRIC_API_KEY_FILE`` set (the frontend's
own switch, ``fabric.frontend.api_key``), every request carries ``Authorization: Bearer`` with
that key, so launchers and benchmarks of a deployment that requires it need nothing more.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fabric.errors import FabricError


@dataclass(frozen=True, slots=True)
class StreamedCompletion:
    """What the client saw of one streamed completion; times are ``perf_counter`` seconds.

    ``arrivals`` holds when each chunk with text or token ids arrived; ``token_ids`` is empty
    unless the server returns them.
    """

    started_at: float
    arrivals: list[float]
    text: str
    completion_tokens: int
    fabric: dict[str, Any]
    token_ids: tuple[int, ...] = ()

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.started_at

    @property
    def total_s(self) -> float:
        return self.arrivals[-1] - self.started_at


def served_model(url: str, timeout_s: float = 10.0) -> str:
    """The id of the model the frontend at ``url`` serves."""
    request = urllib.request.Request(f"{url}/v1/models", headers=_auth_headers())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def stream_completion(
    url: str,
    model: str,
    prompt: str | Sequence[int],
    max_tokens: int,
    timeout_s: float,
    *,
    fabric: dict[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> StreamedCompletion:
    """POST one streaming ``/v1/completions`` and read it to ``[DONE]``.

    Args:
        fabric: the request's routing pin for our frontend (``{"worker": ...,
            "prefill_worker": ...}``, see ``protocol``).
        extra: more request fields (vLLM's ``ignore_eos``, ``return_token_ids``,
            ``kv_transfer_params``...).

    Raises:
        FabricError: the stream carried an error, or ended without ``[DONE]`` or any content.
    """
    body = _body(model, prompt, max_tokens, extra, stream=True)
    body["stream_options"] = {"include_usage": True}
    if fabric is not None:
        body["fabric"] = fabric
    arrivals: list[float] = []
    pieces: list[str] = []
    token_ids: list[int] = []
    info: dict[str, Any] = {}
    completion_tokens = 0
    done = False
    start = time.perf_counter()
    with _post(f"{url}/v1/completions", body, timeout_s) as response:
        for raw in response:
            now = time.perf_counter()
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
                break
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise FabricError(f"the stream from {url} failed: {chunk['error']}")
            info = chunk.get("fabric") or info
            if chunk.get("usage"):
                completion_tokens = int(chunk["usage"]["completion_tokens"])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            text = choice.get("text") or ""
            ids = choice.get("token_ids") or []
            if text or ids:
                arrivals.append(now)
                pieces.append(text)
                token_ids += ids
    if not done or not arrivals:
        raise FabricError(f"the stream from {url} ended without [DONE] or content")
    return StreamedCompletion(
        start, arrivals, "".join(pieces), completion_tokens, info, tuple(token_ids)
    )


def complete(
    url: str,
    model: str,
    prompt: str | Sequence[int],
    max_tokens: int,
    timeout_s: float,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """POST one non-streamed ``/v1/completions``; the response's JSON object."""
    with _post(f"{url}/v1/completions", _body(model, prompt, max_tokens, extra), timeout_s) as r:
        return dict(json.loads(r.read()))


def _body(
    model: str,
    prompt: str | Sequence[int],
    max_tokens: int,
    extra: Mapping[str, Any] | None,
    *,
    stream: bool = False,
) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
        "stream": stream,
        **(extra or {}),
    }


def _post(url: str, body: Mapping[str, Any], timeout_s: float) -> Any:
    headers = {"Content-Type": "application/json", **_auth_headers()}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    return urllib.request.urlopen(request, timeout=timeout_s)


def _auth_headers() -> dict[str, str]:
    """``Authorization: Bearer`` with the frontend's key, when ``FABRIC_API_KEY_FILE`` is set."""
    from fabric.frontend.api_key import ENV_API_KEY_FILE, ApiKey

    key = ApiKey.from_env(ENV_API_KEY_FILE)
    return {} if key is None else {"Authorization": f"Bearer {key.value}"}
