"""The chaos suite's client side: prompts, one bounded request, its outcome, reference texts.

Owns how a request's answer is judged:

* ``SERVED``: the stream ended with ``[DONE]`` and content (its text is judged later against the
  reference: equal is ``ok``, different is a wrong output);
* ``FAILED_CLEARLY``: a 4xx/5xx whose body is OpenAI error JSON, or an SSE error event, within
  the bound;
* ``HUNG``: no answer within the bound (the socket timed out, or the answer came later);
* ``UNCLEAR``: anything else (a stream cut without an error event, a non-JSON error body, a
  refused connection): neither served nor a clear failure, reported in the row's notes.

Prompts are token ids (no tokenizer round trip) drawn from ``[2, vocab)`` by a generator seeded
with (fault, index): every request of a run has its own prompt, so none is a prefix-cache hit
unless a fault repeats one on purpose. ``References`` asks the reference deployment for each
prompt's greedy text once, when it is first needed (after the fault that used it is over).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from fabric.errors import FabricError
from fabric.frontend.client import stream_completion

FIRST_TOKEN_ID = 2
REFERENCE_ATTEMPTS_S = 120.0


class Outcome(Enum):
    SERVED = "served"
    FAILED_CLEARLY = "failed_clearly"
    HUNG = "hung"
    UNCLEAR = "unclear"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's prompt (token ids) and how many tokens it asks for."""

    token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(slots=True)
class Result:
    """What the client saw of one request; times are ``monotonic`` seconds."""

    prompt: Prompt
    sent_at: float
    done_at: float
    outcome: Outcome
    status: int | None = None
    text: str = ""
    fabric: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.done_at - self.sent_at

    @property
    def pd_route(self) -> bool:
        """Served with its prompt's KV read from a prefill worker (no fallback)."""
        return bool(self.fabric.get("prefill_worker")) and not self.fabric.get("fallback")


def make_prompt(vocab: int, num_tokens: int, max_tokens: int, *, fault: str, index: int) -> Prompt:
    """Deterministic random token ids, distinct per (fault, index)."""
    rng = np.random.default_rng([zlib.crc32(fault.encode()), index, 0xC4A05])
    ids = tuple(int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens))
    return Prompt(ids, max_tokens)


def send(url: str, model: str, prompt: Prompt, bound_s: float) -> Result:
    """One streamed completion, judged (see the module docstring); never raises."""
    sent_at = time.monotonic()

    def result(outcome: Outcome, **kwargs: Any) -> Result:
        done_at = time.monotonic()
        if outcome is not Outcome.HUNG and done_at - sent_at > bound_s:
            kwargs["detail"] = f"answered after the bound: {kwargs.get('detail', outcome.value)}"
            outcome = Outcome.HUNG
        return Result(prompt, sent_at, done_at, outcome, **kwargs)

    try:
        got = stream_completion(url, model, list(prompt.token_ids), prompt.max_tokens, bound_s)
    except urllib.error.HTTPError as exc:
        body = _read_body(exc)
        clear = _is_error_json(body)
        outcome = Outcome.FAILED_CLEARLY if clear else Outcome.UNCLEAR
        return result(outcome, status=exc.code, detail=body[:200].decode(errors="replace"))
    except FabricError as exc:
        clear = "failed:" in str(exc)  # an SSE error event; else a stream cut without one
        return result(Outcome.FAILED_CLEARLY if clear else Outcome.UNCLEAR, detail=str(exc))
    except TimeoutError as exc:
        return result(Outcome.HUNG, detail=f"timed out: {exc}")
    except urllib.error.URLError as exc:
        timed_out = isinstance(exc.reason, TimeoutError | socket.timeout)
        return result(Outcome.HUNG if timed_out else Outcome.UNCLEAR, detail=str(exc.reason))
    except (OSError, ValueError) as exc:
        return result(Outcome.UNCLEAR, detail=f"{type(exc).__name__}: {exc}")
    return result(Outcome.SERVED, status=200, text=got.text, fabric=got.fabric)


def _read_body(exc: urllib.error.HTTPError) -> bytes:
    try:
        return bytes(exc.read())
    except OSError:
        return b""


def _is_error_json(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


class Load:
    """Requests sent in the background, each on its own thread (so a slow one never delays the
    next), every ``interval_s`` until ``stop``; ``results`` once joined."""

    def __init__(
        self, submit: Callable[[int], Result], interval_s: float, *, first_index: int = 0
    ) -> None:
        self._submit = submit
        self._interval_s = interval_s
        self._index = first_index
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._results: list[Result] = []
        self._lock = threading.Lock()
        self._pacer = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> Load:
        self._pacer.start()
        return self

    def stop(self, bound_s: float) -> list[Result]:
        """Stop sending; wait (bounded) for the requests in flight; results by send time."""
        self._stop.set()
        self._pacer.join(bound_s)
        deadline = time.monotonic() + bound_s
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return sorted(self._results, key=lambda r: r.sent_at)

    def _run(self) -> None:
        while not self._stop.is_set():
            index = self._index
            self._index += 1
            thread = threading.Thread(target=self._one, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()
            self._stop.wait(self._interval_s)

    def _one(self, index: int) -> None:
        got = self._submit(index)
        with self._lock:
            self._results.append(got)


def concurrently(url: str, model: str, prompts: Sequence[Prompt], bound_s: float) -> list[Result]:
    """Send every prompt at once (one thread each, released together); results in order."""
    barrier = threading.Barrier(len(prompts))

    def one(prompt: Prompt) -> Result:
        barrier.wait(bound_s)
        return send(url, model, prompt, bound_s)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


class References:
    """Each prompt's greedy text on the healthy reference deployment, asked once."""

    def __init__(self, url: str, model: str, bound_s: float) -> None:
        self._url = url
        self._model = model
        self._bound_s = bound_s
        self._prompt_to_text: dict[Prompt, str] = {}

    def texts(self, prompts: Sequence[Prompt]) -> dict[Prompt, str]:
        """The reference texts of ``prompts`` (four at a time; each retried until served)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_to_text))
        with ThreadPoolExecutor(max_workers=4) as pool:
            for prompt, text in zip(missing, pool.map(self._ask, missing), strict=True):
                self._prompt_to_text[prompt] = text
        return {p: self._prompt_to_text[p] for p in prompts}

    def _ask(self, prompt: Prompt) -> str:
        deadline = time.monotonic() + REFERENCE_ATTEMPTS_S
        while True:
            got = send(self._url, self._model, prompt, self._bound_s)
            if got.outcome is Outcome.SERVED:
                return got.text
            if time.monotonic() > deadline:
                raise FabricError(
                    f"the reference deployment did not serve a prompt within "
                    f"{REFERENCE_ATTEMPTS_S:.0f} s: {got.outcome.value} {got.detail}"
                )
            time.sleep(1.0)
