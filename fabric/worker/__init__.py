"""Workers: the prefill and decode roles glued from kvbm, transfer, discovery and signal.

``handoff`` owns the prefill -> decode KV handoff (``PrefillHandoff`` offers and holds blocks,
``DecodeHandoff`` reads the ones it lacks). Imports point down only: ``kvbm``, ``transfer``,
``discovery``, ``signal`` and ``errors``.
"""

from __future__ import annotations

from fabric.worker.handoff import DecodeHandoff, DecodePoolFull, PrefillHandoff

__all__ = ["DecodeHandoff", "DecodePoolFull", "PrefillHandoff"]
