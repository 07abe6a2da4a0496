"""Shared by the tier unit tests: a small vLLM page geometry, pages of random bytes in the
per-layer shapes of vLLM-CPU, FlashInfer and FlashAttention (CPU tensors), vLLM's
hashes of tokens, and the node cache of that geometry (what ``fabric serve node-cache`` builds
for the model)."""

from __future__ import annotations

import torch

from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.node import node_geometry
from fabric.integrations.vllm.pages import KvPages, PageGeometry
from fabric.kvbm import SequenceHash, hash_token_blocks, load_kvbm_config
from fabric.node import NodeCacheConfig

BS, LAYERS, HEADS, HEAD = 4, 2, 2, 8
GEOMETRY = PageGeometry(
    model="fake",
    dtype="float16",
    num_layers=LAYERS,
    num_kv_heads=HEADS,
    head_size=HEAD,
    head_size_v=HEAD,
    block_size=BS,
    kv_layout="",
    page_bytes=HEADS * BS * 2 * HEAD * 2,
)
VLLM_BLOCKS = 16
NODE = "test"


LAYER_SHAPES = {
    "vllm-cpu": (VLLM_BLOCKS, HEADS, BS, 2 * HEAD),  # blocks outermost, K then V per head
    "flashinfer": (VLLM_BLOCKS, 2, BS, HEADS, HEAD),  # blocks outermost, K/V then tokens
    "flash-attn": (2, VLLM_BLOCKS, BS, HEADS, HEAD),  # K and V apart (NHD)
}
"""One layer's KV tensor of each backend (CPU tensors of its shape)."""


def vllm_kv_caches(seed: int, backend: str = "vllm-cpu") -> dict[str, torch.Tensor]:
    """What vLLM hands ``register_kv_caches``: one random page tensor per layer."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.attn": torch.randn(LAYER_SHAPES[backend], generator=generator).half()
        for i in range(LAYERS)
    }


def vllm_pages(seed: int, backend: str = "vllm-cpu") -> KvPages:
    kv_caches = vllm_kv_caches(seed, backend)
    return KvPages.from_kv_caches(GEOMETRY, kv_caches, list(kv_caches))


def vllm_hashes(tokens: list[int]) -> list[SequenceHash]:
    return hash_token_blocks(tokens, BS, seed=GEOMETRY.hash_seed).sequence_hashes


def connector_config(**extra: object) -> ConnectorConfig:
    return ConnectorConfig.from_extra(extra, kv_role="kv_both", engine_id="e")


def node_config(namespace: str) -> NodeCacheConfig:
    """A node cache for the tiny model's KV geometry, as ``fabric serve node-cache`` builds it."""
    return NodeCacheConfig(
        kvbm=load_kvbm_config(block_size=BS, cpu_cache_blocks=32),
        geometry=node_geometry(GEOMETRY),
        namespace=namespace,
        node=NODE,
    )
