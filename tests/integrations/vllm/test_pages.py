"""vLLM's KV layouts as fabric blocks, without vLLM: every layout's gather and scatter against a
reference built from the physical tensors, and through the connector's host tier.

Layouts (per layer, ``NB`` blocks, ``BS`` tokens, ``H`` KV heads, ``D`` head size), built as
vLLM builds them (a contiguous physical allocation, handed over as a logical view):

* ``cpu``: vLLM-CPU, ``[NB, H, BS, 2D]``;
* ``flashinfer``: ``[NB, 2, BS, H, D]``;
* ``flash_nhd``: FlashAttention, ``[2, NB, BS, H, D]``;
* ``flash_hnd``: physically ``[2, NB, H, BS, D]``, handed over as ``[2, NB, BS, H, D]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fabric.errors import LayoutMismatch
from fabric.integrations.vllm.pages import KvPages, PageGeometry
from fabric.kvbm import LayoutKind, copy_blocks, host_storage

NB, BS, H, D, LAYERS = 12, 4, 2, 8, 3
PAGE = 2 * BS * H * D * 2  # float16


def geometry(layout: str) -> PageGeometry:
    return PageGeometry(
        model="fake",
        dtype="float16",
        num_layers=LAYERS,
        num_kv_heads=H,
        head_size=D,
        head_size_v=D,
        block_size=BS,
        kv_layout=layout,
        page_bytes=PAGE,
    )


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# layout -> (physical shape, logical view of the physical tensor, one block's bytes from it)
LAYOUTS: dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor], Callable]] = {
    "cpu": ((NB, H, BS, 2 * D), lambda p: p, lambda p, b: _bytes(p[b])),
    "flashinfer": ((NB, 2, BS, H, D), lambda p: p, lambda p, b: _bytes(p[b])),
    "flash_nhd": ((2, NB, BS, H, D), lambda p: p, lambda p, b: _bytes(p[0, b]) + _bytes(p[1, b])),
    "flash_hnd": (
        (2, NB, H, BS, D),
        lambda p: p.permute(0, 1, 3, 2, 4),
        lambda p, b: _bytes(p[0, b]) + _bytes(p[1, b]),
    ),
}


def build(layout: str, seed: int) -> tuple[KvPages, list[torch.Tensor]]:
    shape, logical, _ = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    physical = [torch.randn(shape, generator=generator).half() for _ in range(LAYERS)]
    names = [f"l{i}" for i in range(LAYERS)]
    caches = {n: logical(p) for n, p in zip(names, physical, strict=True)}
    return KvPages.from_kv_caches(geometry(layout), caches, names), physical


def reference(layout: str, physical: list[torch.Tensor], blocks: list[int]) -> np.ndarray:
    block_bytes = LAYOUTS[layout][2]
    rows = [b"".join(block_bytes(p, b) for p in physical) for b in blocks]
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(blocks), -1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_matches_the_physical_bytes_and_scatter_inverts_it(layout: str) -> None:
    pages, physical = build(layout, seed=1)
    blocks = [7, 0, 3, 11]
    got = pages.gather(blocks)
    assert got.shape == (4, LAYERS * PAGE)
    assert np.array_equal(got, reference(layout, physical, blocks))
    pages.scatter([1, 2, 4, 5], got)
    assert np.array_equal(reference(layout, physical, [1, 2, 4, 5]), got)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_storage_copies_the_same_bytes_through_a_host_tier(layout: str) -> None:
    pages, physical = build(layout, seed=2)
    spec = pages.layout_spec()
    assert spec.block_bytes == LAYERS * PAGE
    host = host_storage(
        spec.__class__(
            LayoutKind.FULLY_CONTIGUOUS,
            6,
            spec.num_layers,
            spec.outer_dim,
            spec.block_size,
            spec.inner_dim,
            spec.dtype,
        )
    )
    storage = pages.storage()
    expected = reference(layout, physical, [9, 2])
    copy_blocks(storage, [9, 2], host, [4, 0])
    copy_blocks(host, [4, 0], storage, [6, 8])
    assert np.array_equal(reference(layout, physical, [6, 8]), expected)
    packed = host.tensors[0].view(torch.uint8).numpy().reshape(6, -1)
    assert np.array_equal(packed[[4, 0]], expected)  # host rows are the gather format


def test_layouts_the_connector_cannot_move_are_refused_by_name() -> None:
    names = [f"l{i}" for i in range(LAYERS)]
    tokens_outer = {n: torch.zeros(BS, NB, H, 2 * D).half() for n in names}
    with pytest.raises(LayoutMismatch, match="neither blocks"):
        KvPages.from_kv_caches(geometry("odd"), tokens_outer, names)
    sliced = {n: torch.zeros(NB, H, BS, 4 * D).half()[..., : 2 * D] for n in names}
    with pytest.raises(LayoutMismatch, match="not a permutation"):
        KvPages.from_kv_caches(geometry("odd"), sliced, names)
    with pytest.raises(LayoutMismatch, match="dtype"):
        KvPages.from_kv_caches(
            geometry("cpu"), {n: torch.zeros(NB, H, BS, 2 * D) for n in names}, names
        )
    with pytest.raises(LayoutMismatch, match="l1"):
        KvPages.from_kv_caches(geometry("cpu"), {"l0": torch.zeros(NB, H, BS, 2 * D).half()}, names)
