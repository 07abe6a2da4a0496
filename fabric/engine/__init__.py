"""The reference engine: a Llama decoder whose KV cache is the KVBM device pool.

``ModelConfig`` reads a Hugging Face ``config.json``; ``Engine`` loads the weights and computes
prefill and batched decode steps over paged KV; ``SequenceBlocks`` ties one request to its device
blocks; ``ensure_model`` makes the embedded tiny and small presets offline.
"""

from __future__ import annotations

from fabric.engine.config import ModelConfig
from fabric.engine.engine import (
    DecodeRequest,
    Engine,
    EngineStats,
    FinishReason,
    Generation,
    greedy,
)
from fabric.engine.tiny import Preset, ensure_model
from fabric.kvbm import SequenceBlocks

__all__ = [
    "DecodeRequest",
    "Engine",
    "EngineStats",
    "FinishReason",
    "Generation",
    "ModelConfig",
    "Preset",
    "SequenceBlocks",
    "ensure_model",
    "greedy",
]
