"""Per-request KV traces of a vLLM instance: where each range of a prompt's K/V came from.

The reference workers' trace (``fabric.signal.kv_trace.KvTrace``: ``device`` / ``host`` /
``disk`` / ``g4`` / ``node`` / ``peer`` / ``prefill`` / ``recompute`` segments) built by the
connector's scheduler side from what it already plans, per request::

    get_num_new_matched_tokens ──▶ looked_up: vLLM's own prefix hit (``device``)
    update_state_after_alloc   ──▶ planned: device, then each planned load in prompt order
        │                          (G2 ``host``, G3 ``disk``, ``node``, G4 ``g4``, or a P/D read:
        │                          ``prefill`` for a kv_consumer, ``peer`` for kv_both); again
        │                          after an async read landed: no lookup before it, trace kept
    update_connector_output    ──▶ load_errors: cut at the first block that failed to load,
        │                          ``fallback`` says which source failed and from where
    request_finished           ──▶ finished: the rest up to the prompt's end is ``recompute``;
                                   the flat stats returned, and logged once

``finished`` returns what a reference worker sends in its last ``TokenChunk.stats``
(``kv_trace`` in the compact wire form, ``prefill_worker``, ``fallback``), which
``FabricConnector.request_finished`` returns in the request's ``kv_transfer_params`` as
``fabric_stats``; ``fabric.frontend.traces.kv_trace_view`` turns it into the response's
``fabric.kv_trace`` object and ``TraceLog`` logs that once per request as for the reference
workers (``request <id> kv: <JSON>``, INFO when it fell back, DEBUG otherwise) and keeps the
last ones (``recent``). The connector measures no per-request step times (vLLM's own metrics
have them): ``steps_ms`` are 0.

Invariants: loaded segments end before the prompt's last token (vLLM always computes it, also
after a P/D read of the whole prompt); a trace is rebuilt at each allocation (a preempted
request's trace describes its last admission); ``finished`` forgets the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.frontend.traces import TraceLog, kv_trace_view
from fabric.kvbm import Tier
from fabric.signal.kv_trace import KvSegment, KvSource, KvTrace

TIER_TO_SOURCE = {
    Tier.HOST: KvSource.HOST,
    Tier.DISK: KvSource.DISK,
    Tier.NODE: KvSource.NODE,
    Tier.SHARED: KvSource.G4,
}
"""The trace source of each tier the connector loads from (the reference workers' names)."""


@dataclass(slots=True)
class PlannedLoad:
    """Prompt positions ``start .. end - 1`` to be loaded from ``source`` into ``block_ids``
    (the first at ``start``'s block)."""

    source: KvSource
    start: int
    end: int
    block_ids: tuple[int, ...]


@dataclass(slots=True)
class _Open:
    num_prompt_tokens: int
    trace: KvTrace = field(default_factory=KvTrace)
    loads: list[PlannedLoad] = field(default_factory=list)
    prefill_worker: str = ""
    fallback: str = ""


class RequestTraces:
    """The open traces of the scheduler side (module docstring)."""

    def __init__(self, block_size: int, remote_source: KvSource, log: TraceLog | None = None):
        self.block_size = block_size
        self.remote_source = remote_source
        """``prefill`` (a kv_consumer reads from prefill instances) or ``peer`` (kv_both)."""
        self.log = log if log is not None else TraceLog()
        self._num_local: dict[str, int] = {}
        self._open: dict[str, _Open] = {}

    def looked_up(self, req_id: str, num_local_tokens: int) -> None:
        """vLLM holds the prompt's first ``num_local_tokens`` in its own prefix cache."""
        self._num_local[req_id] = num_local_tokens

    def planned(
        self,
        req_id: str,
        num_prompt_tokens: int,
        loads: Sequence[tuple[KvSource, int, Sequence[int]]],
        *,
        prefill_worker: str = "",
    ) -> None:
        """Start ``req_id``'s trace afresh: its local hit, then ``loads`` in prompt order, each
        ``(source, num_tokens, vLLM block ids)``; ``prefill_worker`` the P/D source.

        An allocation with no lookup before it (vLLM scheduling a request again once its P/D
        read landed) keeps the trace planned at the lookup's."""
        if req_id not in self._num_local and req_id in self._open:
            return
        state = _Open(num_prompt_tokens, prefill_worker=prefill_worker)
        limit = num_prompt_tokens - 1
        state.trace.add(KvSource.DEVICE, min(self._num_local.pop(req_id, 0), limit))
        position = state.trace.end
        for source, num_tokens, block_ids in loads:
            end = min(position + num_tokens, limit)
            if end <= position:
                break
            state.trace.add(source, end)
            state.loads.append(PlannedLoad(source, position, end, tuple(block_ids)))
            position = end
        self._open[req_id] = state

    def load_errors(self, invalid_block_ids: set[int]) -> None:
        """Blocks the workers failed to load: each trace that planned one is cut at its first
        failed block (vLLM recomputes from there), and says why."""
        if not invalid_block_ids:
            return
        for state in self._open.values():
            for load in state.loads:
                failed = [i for i, b in enumerate(load.block_ids) if b in invalid_block_ids]
                if failed:
                    self._cut(state, load, failed[0])
                    break

    def _cut(self, state: _Open, load: PlannedLoad, index: int) -> None:
        position = load.start + index * self.block_size
        if position >= state.trace.end:
            return
        where = (
            f"the read from {state.prefill_worker}"
            if load.source is self.remote_source
            else f"the {load.source.value} tier's load"
        )
        state.fallback = f"{where} failed at token {position}; recomputed from there"
        state.trace = _truncated(state.trace.segments, position)
        state.loads = [x for x in state.loads if x.start < position]
        if not any(s.source is self.remote_source for s in state.trace.segments):
            state.prefill_worker = ""

    def finished(self, req_id: str) -> dict[str, str]:
        """``req_id``'s trace (the rest recomputed) as a reference worker's stats, logged once;
        an empty trace for a request never allocated (aborted while waiting)."""
        self._num_local.pop(req_id, None)
        state = self._open.pop(req_id, None)
        stats = {"kv_trace": "", "prefill_worker": "", "fallback": ""}
        if state is not None:
            state.trace.add(KvSource.RECOMPUTE, state.num_prompt_tokens)
            stats = {
                "kv_trace": state.trace.encode(),
                "prefill_worker": state.prefill_worker,
                "fallback": state.fallback,
            }
        view = kv_trace_view(stats, route_ms=0.0, frontend_queue_ms=0.0, first_token_ms=None)
        self.log.record(req_id, {"kv_trace": view})
        return stats

    def recent(self, req_id: str) -> dict[str, Any] | None:
        """The ``{"kv_trace": ...}`` of one of the last ended requests (``TraceLog.get``)."""
        return self.log.get(req_id)


def _truncated(segments: Sequence[KvSegment], position: int) -> KvTrace:
    """The trace of ``segments`` up to ``position`` (exclusive)."""
    trace = KvTrace()
    for segment in segments:
        trace.add(segment.source, min(segment.end, position))
    return trace
