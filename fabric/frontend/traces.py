"""Per-request KV traces on the frontend: the response's ``fabric.kv_trace`` and the recent ones.

Owns turning a serving worker's statistics (``TokenChunk.stats``, ``fabric.signal.kv_trace``'s
compact ``kv_trace`` string among them) and the frontend's own timings into one ``kv_trace``
object, and ``TraceLog``: the ``fabric`` field of the last ``capacity`` ended requests, which
``GET /v1/requests/{id}`` serves, each also logged once (INFO when it fell back or failed,
DEBUG otherwise) as ``request <id> kv: <JSON>``. The shape::

    {"segments": [{"source": "host", "start": 0, "end": 64, "worker": ""},
                  {"source": "prefill", "start": 64, "end": 100, "worker": "prefill-1"}],
     "steps_ms": {"route": 0.4, "queue": 1.2, "onboard": 0.3, "transfer": 2.1,
                  "transfer_wait": 0.2, "prefill": 30.5, "first_token": 36.0},
     "fallback": ""}

``segments`` are token positions (end exclusive) in prompt order: ``device`` / ``host`` /
``disk`` / ``g4`` / ``node`` (the serving worker's own tiers and its node cache), ``peer`` /
``prefill`` (read over NIXL from ``worker``), ``recompute`` (computed by the serving worker).
Empty when the worker sent no trace (a vLLM instance, or a request that failed before its
prompt's source was decided). ``steps_ms``: ``route`` the router's choice and send, ``queue``
the wait before that on this frontend (tokenizing included) plus the wait for blocks on the
worker, ``onboard`` matching and onboarding the cached prefix on the worker, ``transfer``
reading KV over NIXL (and the node cache; a layer-wise read from its first READ to its last,
overlapping the prefill's compute), ``transfer_wait`` the part of it the first token waited
for after the prefill finished (all of it for a whole-prompt read), ``prefill`` computing the
prompt (here or on the prefill worker), ``first_token`` from arrival on this frontend to the
first token. ``fallback`` is why the prompt was recomputed on the serving worker ("" when it
was not).

Invariants: the log holds at most ``capacity`` requests, oldest dropped first; a request is in
it only once it ended (finished, failed or aborted); it is touched on the event loop only.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fabric.frontend.protocol import FabricInfo, KvSegmentInfo, KvTraceInfo
from fabric.signal.kv_trace import KvSource, KvTrace

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1024
"""Ended requests ``GET /v1/requests/{id}`` can show (a few hundred bytes each)."""
_REMOTE = (KvSource.PEER, KvSource.PREFILL)
_WORKER_STEPS = {
    "onboard": "onboard_ms",
    "transfer": "kv_transfer_ms",
    "transfer_wait": "kv_wait_ms",
    "prefill": "prefill_ms",
}


def _ms(value: object) -> float:
    return round(float(value), 3) if isinstance(value, int | float) else 0.0


def kv_trace_view(
    stats: Mapping[str, object],
    *,
    route_ms: float,
    frontend_queue_ms: float,
    first_token_ms: float | None,
) -> KvTraceInfo:
    """The ``kv_trace`` object of a response (module docstring) from the worker's ``stats``.

    A trace the worker sent malformed is shown as no segments (and logged): the response must
    not fail for a diagnostic.
    """
    try:
        trace = KvTrace.decode(str(stats.get("kv_trace", "")))
    except ValueError as exc:
        logger.warning("a worker sent an unreadable kv_trace: %s", exc)
        trace = KvTrace()
    source_worker = str(stats.get("prefill_worker", ""))
    steps = {"route": round(route_ms, 3)}
    steps["queue"] = round(frontend_queue_ms + _ms(stats.get("queue_ms")), 3)
    steps.update({step: _ms(stats.get(key)) for step, key in _WORKER_STEPS.items()})
    steps["first_token"] = round(first_token_ms, 3) if first_token_ms is not None else 0.0
    segments = [
        KvSegmentInfo(
            source=s.source.value,
            start=s.start,
            end=s.end,
            worker=source_worker if s.source in _REMOTE else "",
        )
        for s in trace.segments
    ]
    return KvTraceInfo(segments=segments, steps_ms=steps, fallback=str(stats.get("fallback", "")))


class TraceLog:
    """The ``fabric`` field of the last ``capacity`` ended requests (module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"a trace log of {capacity} requests: give at least 1")
        self.capacity = capacity
        self._id_to_info: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._id_to_info)

    def record(self, request_id: str, fabric: FabricInfo) -> None:
        """Keep ``fabric`` as ``request_id``'s (dropping the oldest beyond capacity), log it."""
        info = {
            key: value.model_dump() if isinstance(value, KvTraceInfo) else value
            for key, value in fabric.items()
        }
        self._id_to_info[request_id] = info
        self._id_to_info.move_to_end(request_id)
        while len(self._id_to_info) > self.capacity:
            self._id_to_info.popitem(last=False)
        trace = fabric.get("kv_trace")
        notable = (isinstance(trace, KvTraceInfo) and bool(trace.fallback)) or "error" in info
        if logger.isEnabledFor(logging.INFO if notable else logging.DEBUG):
            logger.log(
                logging.INFO if notable else logging.DEBUG,
                "request %s kv: %s",
                request_id,
                json.dumps(info, separators=(",", ":"), sort_keys=True),
            )

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self._id_to_info.get(request_id)
