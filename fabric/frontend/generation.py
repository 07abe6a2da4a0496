"""One request from routing to its last token: ``Frontend.start`` and the ``Generation`` it returns.

Owns the request lifecycle on the event loop, between the HTTP layer (``api``) and the router,
and the frontend's settings (``FrontendSettings``). Before ``start`` a request is queued in
``admission`` (tokenized by ``Frontend.encode`` on the tokenizer threads); ``start`` waits there
for a serving worker with room, then::

    start ──route + send──▶ RUNNING ──finished chunk──▶ DONE        (slots released)
                               │
                               ├──refused (draining worker)──▶ RUNNING on another worker,
                               │     after waiting in ``admission`` when all are at their cap
                               ├──error chunk / StreamFailure──▶ FAILED (ApiError raised)
                               ├──no chunk for idle_timeout_s, or past the deadline──▶ FAILED (504)
                               └──abort() (client gone)──▶ ABORTED

Every path out of RUNNING also records the request's ``fabric`` field (its KV trace included)
in the frontend's ``TraceLog`` once (``traces``).

Invariants: every path out of RUNNING releases the request's worker slots exactly once; every
path but DONE sends ``Abort`` to the worker (harmless when it already stopped), so a worker never
keeps generating for a client that is gone or a request the frontend gave up on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TypeVar

from fabric.errors import ConfigError
from fabric.frontend.admission import Admission, Ticket
from fabric.frontend.connection import StreamFailure
from fabric.frontend.errors import ApiError, deadline_exceeded, worker_error
from fabric.frontend.limits import PromptLimit
from fabric.frontend.metrics import FrontendMetrics
from fabric.frontend.protocol import FabricInfo
from fabric.frontend.router import RoutedRequest, RoutePin, Router
from fabric.frontend.tokenizer import Detokenizer, TextCodec
from fabric.frontend.traces import TraceLog, kv_trace_view
from fabric.signal.framing import wall_ms

Scalar = float | int | str | bool
T = TypeVar("T")
DEFAULT_MAX_PROMPT_TOKENS = 32768
"""The prompt limit when neither the settings nor the model's ``config.json`` give one."""


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """Timeouts and limits of request handling (the CLI flag of each in parentheses).

    Attributes:
        idle_timeout_s: a request that receives no chunk for this long fails with 504 (the
            first chunk includes the prefill, so this bounds TTFT too) (``--idle-timeout``).
        request_timeout_s: the whole request's deadline, from its arrival (sent as
            ``deadline_ms``; 504 past it) (``--request-timeout``).
        default_max_tokens: ``max_tokens`` of a request that gives none.
        max_body_bytes: the largest request body; 4 MiB holds a prompt of 128k tokens as text
            or ids (``--max-body-bytes``; ``limits``).
        max_prompt_tokens: the longest prompt; None: the model's context
            (``max_position_embeddings``), else ``DEFAULT_MAX_PROMPT_TOKENS``
            (``--max-prompt-tokens``).
        max_in_flight_per_worker: requests this frontend keeps in flight on one serving worker
            (``--max-in-flight-per-worker``). A reference worker computes one prompt at a time
            while it decodes every admitted request, so the n-th request waits about n
            prefills for its first token: with 8 and 2048-token small-preset prompts (3.2 s
            each on one core, docs/benchmarks.md) about 26 s, well inside the 60 s idle
            timeout, and far below the worker's own queue bound (``max_waiting``, 64).
        max_queued: requests waiting in this frontend for tokenizing or for a worker with room
            (``--max-queued``); beyond it a request is refused with 429 at once.
        queue_timeout_s: the longest wait for a worker with room, from arrival; then 429
            (``--queue-timeout``).
        tokenizer_threads: threads tokenizing prompts off the event loop
            (``--tokenizer-threads``).
    """

    idle_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None
    max_in_flight_per_worker: int = 8
    max_queued: int = 64
    queue_timeout_s: float = 1.0
    tokenizer_threads: int = 2

    def __post_init__(self) -> None:
        bad = [
            f.name
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None and not value > 0
        ]
        if bad:
            raise ConfigError(f"frontend settings must be > 0: {', '.join(bad)}")


@dataclass(frozen=True, slots=True)
class Output:
    """What one chunk added: decoded text (may be "") and tokens; ``finish_reason`` on the last."""

    text: str
    num_tokens: int
    finish_reason: str | None


class Generation:
    """The output stream of one routed request (see the module docstring)."""

    def __init__(
        self,
        routed: RoutedRequest,
        detokenizer: Detokenizer,
        metrics: FrontendMetrics,
        settings: FrontendSettings,
        received_at: float,
        *,
        traces: TraceLog,
        route_ms: float = 0.0,
        queue_ms: float = 0.0,
    ) -> None:
        self.routed = routed
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.stats: dict[str, Scalar] = {}
        self._detokenizer = detokenizer
        self._metrics = metrics
        self._settings = settings
        self._received_at = received_at
        self._deadline = received_at + settings.request_timeout_s
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._ended = False
        self._traces = traces
        self._route_ms = route_ms
        self._queue_ms = queue_ms

    @property
    def request_id(self) -> str:
        return self.routed.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.routed.request.token_ids)

    @property
    def ended(self) -> bool:
        return self._ended

    async def next(self) -> Output | None:
        """The next chunk's output, or None once finished.

        Raises:
            ApiError: the worker failed (500), went away (503) or was too slow (504), or it
                refused the request (draining) and no other worker had room in the admission
                queue's bounds (429); the request was aborted and its slots released.
        """
        if self._ended:
            return None
        wait_s = max(0.0, min(self._settings.idle_timeout_s, self._deadline - time.monotonic()))
        try:
            item = await self.routed.next_item(wait_s)
        except ApiError as exc:  # refused by a draining worker, then by the admission queue
            self._fail(exc.message)
            raise
        if item is None:
            past_deadline = time.monotonic() >= self._deadline
            what = "the request deadline" if past_deadline else "the idle timeout"
            self._fail(f"no tokens from worker {self.routed.serving.worker_id} within {what}")
            raise deadline_exceeded(
                f"worker {self.routed.serving.worker_id} sent no tokens within {wait_s:.1f} s "
                f"({what}); the request was aborted"
            )
        if isinstance(item, StreamFailure):
            self._fail(item.message)
            raise ApiError(item.status, item.message, code=item.code)
        self.routed.prefill_done()
        if item.finish_reason == "error":
            message = str(item.stats.get("error") or "the worker reported an error")
            self.stats = {**item.stats, "error": message}
            self._fail(message)
            raise worker_error(f"worker {self.routed.serving.worker_id}: {message}")
        self._observe(len(item.token_ids))
        text = self._detokenizer.step(item.token_ids)
        if item.finished:
            self._ended = True
            self.finish_reason = item.finish_reason
            self.stats = dict(item.stats)
            self._metrics.observe_transfer(self.stats, self.routed.serving.layout)
            self.routed.finish()
            self._traces.record(self.request_id, self.fabric_info())
        return Output(text, len(item.token_ids), item.finish_reason or None)

    def abort(self, reason: str) -> None:
        """Cancel the request on its worker unless it already ended (idempotent)."""
        if not self._ended:
            self.stats = {**self.stats, "error": f"aborted: {reason}"}
            self._fail(reason)

    def fabric_info(self) -> FabricInfo:
        """The response's ``fabric`` field: routing and the worker's statistics.

        ``worker`` (and, as before, ``decode_worker``) is the serving worker;
        ``routed_prefill_worker`` the KV source the router named ("" for none); ``prefill_worker``
        starts as the same and is replaced by the worker's own statistic when it reports one
        (who supplied the KV in the end: "" after a fallback, with ``fallback`` saying why);
        ``route`` is the ``RouteKind``; ``routed_prefix_blocks`` and ``routed_local_blocks`` are
        the full prompt blocks the router saw cached on the KV provider (the source, or the
        serving worker for a local route) and on the serving worker; ``kv_trace`` is
        ``traces.kv_trace_view``'s (the worker's compact ``kv_trace`` statistic decoded).
        """
        routed = self.routed
        route = routed.route
        info: FabricInfo = {
            "worker": routed.serving.worker_id,
            "decode_worker": routed.serving.worker_id,
            "prefill_worker": routed.request.prefill_worker,
            "routed_prefill_worker": routed.request.prefill_worker,
            "route": route.kind.value,
            "route_pinned": route.pinned,
            "routed_prefix_blocks": route.source_blocks,
            "routed_local_blocks": route.local_blocks,
        }
        first_token_ms = None
        if self._first_token_at is not None:
            first_token_ms = (self._first_token_at - self._received_at) * 1e3
            info["frontend_ttft_ms"] = round(first_token_ms, 3)
        info.update(self.stats)
        info["kv_trace"] = kv_trace_view(
            self.stats,
            route_ms=self._route_ms,
            frontend_queue_ms=self._queue_ms,
            first_token_ms=first_token_ms,
        )
        return info

    def _observe(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
            self._metrics.ttft.observe(now - self._received_at)
        elif self._last_token_at is not None:
            gap = (now - self._last_token_at) / num_tokens
            for _ in range(num_tokens):
                self._metrics.itl.observe(gap)
        self._last_token_at = now
        self.completion_tokens += num_tokens
        self._metrics.completion_tokens.inc(num_tokens)

    def _fail(self, reason: str) -> None:
        self._ended = True
        self.routed.abort(reason)
        self._traces.record(self.request_id, self.fabric_info())


class Frontend:
    """Routes requests and wraps them as ``Generation``s; the HTTP layer's one collaborator.

    Owns (and ``close`` closes) the router and the tokenizer threads.
    """

    def __init__(
        self,
        router: Router,
        codec: TextCodec,
        metrics: FrontendMetrics,
        admission: Admission,
        tokenizer_pool: ThreadPoolExecutor,
        *,
        model_name: str,
        settings: FrontendSettings,
    ) -> None:
        self.router = router
        self.codec = codec
        self.metrics = metrics
        self.admission = admission
        self.model_name = model_name
        self.settings = settings
        self.prompt_limit = PromptLimit(
            settings.max_prompt_tokens or codec.max_model_len or DEFAULT_MAX_PROMPT_TOKENS,
            codec.max_token_chars,
        )
        self.created = int(time.time())
        self.traces = TraceLog()
        """The ``fabric`` field of recently ended requests (``GET /v1/requests/{id}``)."""
        self._tokenizer_pool = tokenizer_pool

    async def encode(self, text: str) -> list[int]:
        """``text``'s token ids, tokenized on the tokenizer threads (the loop stays free)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, self.codec.encode, text)

    async def start(
        self,
        ticket: Ticket,
        prefix: str,
        token_ids: list[int],
        *,
        max_tokens: int,
        sampling: dict[str, Scalar],
        pin: RoutePin | None = None,
    ) -> Generation:
        """Route and send one queued request once a worker has room (``prefix`` starts its id,
        e.g. ``"cmpl"``).

        Raises:
            ApiError: 429 when no worker had room in time; 503 when no worker serves the model;
                400 when ``pin`` cannot be honoured.
        """
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline = ticket.arrived_at + self.settings.request_timeout_s

        sent_at: list[float] = []

        def submit() -> RoutedRequest:
            sent_at.append(time.monotonic())
            return self.router.submit(
                request_id,
                token_ids,
                max_tokens=max_tokens,
                sampling=sampling,
                deadline_ms=wall_ms() + int((deadline - time.monotonic()) * 1000),
                loop=loop,
                pin=pin,
                requeue=self._requeue,
            )

        routed = await self.admission.dispatch(ticket, submit)
        routed_at = time.monotonic()
        route = routed.route
        self.metrics.prompt_tokens.inc(len(token_ids))
        self.metrics.routes.labels(route.kind.value).inc()
        if route.num_blocks:
            self.metrics.prefix_blocks.labels("hit").inc(route.source_blocks)
            self.metrics.prefix_blocks.labels("miss").inc(route.num_blocks - route.source_blocks)
        return Generation(
            routed,
            self.codec.detokenizer(),
            self.metrics,
            self.settings,
            ticket.arrived_at,
            traces=self.traces,
            route_ms=(routed_at - sent_at[-1]) * 1e3,
            queue_ms=(sent_at[-1] - ticket.arrived_at) * 1e3,
        )

    async def _requeue(self, attempt: Callable[[], T]) -> T:
        """Queue a request a draining worker refused until ``attempt`` finds room, as a new
        arrival (the same bound, order and timeout; 429 with ``Retry-After`` past them)."""
        with self.admission.enter() as ticket:
            return await self.admission.dispatch(ticket, attempt)

    def close(self) -> None:
        """Close the router (open requests fail) and stop the tokenizer threads."""
        self.router.close()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
