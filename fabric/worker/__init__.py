"""Workers: the prefill, decode and aggregated processes, glued from the layers below.

``runtime`` wires one worker process (``build_worker``); ``scheduler`` owns its engine and block
manager on one thread; ``generation`` serves ``GenerateRequest``s (decode and aggregated roles),
``prefill_service`` serves ``PrefillRequest``s (prefill role), ``remote_prefill`` is the decode
side's link to prefill workers and ``handoff`` the prefill -> decode KV handoff itself;
``request`` holds one request's record and stats, ``metrics`` the worker's Prometheus metrics,
``serve`` the ``fabric serve`` command. Imports point down only: ``engine``, ``kvbm``,
``transfer``, ``discovery``, ``signal``, ``config`` and ``errors``.
"""

from __future__ import annotations

from fabric.worker.handoff import DecodeHandoff, DecodePoolFull, PrefillHandoff, Releasable
from fabric.worker.runtime import WorkerRuntime, build_worker

__all__ = [
    "DecodeHandoff",
    "DecodePoolFull",
    "PrefillHandoff",
    "Releasable",
    "WorkerRuntime",
    "build_worker",
]
