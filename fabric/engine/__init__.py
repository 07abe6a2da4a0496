"""The reference engine: a Llama decoder whose KV cache is the KVBM device pool.

``Engine`` loads a model directory (``fabric.models``) and computes steps of prefill chunks
and batched decodes over paged KV, addressed through a request's ``fabric.kvbm.SequenceBlocks``.
"""

from __future__ import annotations

from fabric.engine.engine import (
    DecodeRequest,
    Engine,
    EngineFinish,
    EngineOutput,
    EngineStats,
    PrefillChunk,
    greedy,
)

__all__ = [
    "DecodeRequest",
    "Engine",
    "EngineStats",
    "EngineFinish",
    "EngineOutput",
    "PrefillChunk",
    "greedy",
]
