"""A minimal client of our frontend for launchers and benchmarks: one streamed completion, timed.

Stdlib only (``urllib``), so a launcher needs nothing beyond the package. Reads the SSE stream of
``/v1/completions`` and keeps what a person or a benchmark wants to know: when each text chunk
arrived, the text, the usage and the non-OpenAI ``fabric`` field (route and worker statistics)
of the final chunk. Not a general OpenAI client: use the ``openai`` package for that.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fabric.errors import FabricError


@dataclass(frozen=True, slots=True)
class StreamedCompletion:
    """What the client saw of one streamed completion; times are ``perf_counter`` seconds."""

    started_at: float
    arrivals: list[float]
    text: str
    completion_tokens: int
    fabric: dict[str, Any]

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.started_at

    @property
    def total_s(self) -> float:
        return self.arrivals[-1] - self.started_at


def served_model(url: str, timeout_s: float = 10.0) -> str:
    """The id of the model the frontend at ``url`` serves."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout_s) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def stream_completion(
    url: str,
    model: str,
    prompt: str | Sequence[int],
    max_tokens: int,
    timeout_s: float,
    *,
    fabric: dict[str, str] | None = None,
) -> StreamedCompletion:
    """POST one streaming ``/v1/completions`` and read it to ``[DONE]``; ``fabric`` is the
    request's routing pin (``{"worker": ..., "prefill_worker": ...}``, see ``protocol``).

    Raises:
        FabricError: the stream carried an error, or ended without ``[DONE]`` or any text.
    """
    body = {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else list(prompt),
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if fabric is not None:
        body["fabric"] = fabric
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    arrivals: list[float] = []
    pieces: list[str] = []
    info: dict[str, Any] = {}
    completion_tokens = 0
    done = False
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
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
            text = chunk["choices"][0].get("text", "") if chunk.get("choices") else ""
            if text:
                arrivals.append(now)
                pieces.append(text)
    if not done or not arrivals:
        raise FabricError(f"the stream from {url} ended without [DONE] or text")
    return StreamedCompletion(start, arrivals, "".join(pieces), completion_tokens, info)
