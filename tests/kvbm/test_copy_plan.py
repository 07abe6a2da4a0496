"""The per-(source, target) copy plan cache: a plan never outlives or crosses its storages."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from fabric.kvbm.core.layout import KvGeometry, LayoutKind
from fabric.kvbm.tiers import copy_plan
from fabric.kvbm.tiers.block_copy import copy_blocks
from fabric.kvbm.tiers.storage import TensorStorage, host_storage

GEOMETRY = KvGeometry(num_layers=3, num_kv_heads=2, head_size=8, dtype=torch.float16)


def _storage(kind: LayoutKind, num_blocks: int, alignment: int = 1) -> TensorStorage:
    layout = dataclasses.replace(GEOMETRY.layout(kind, num_blocks, 4), alignment=alignment)
    storage = host_storage(layout, pin=False)
    for i, t in enumerate(storage.tensors):
        t.view(torch.uint8).copy_(
            torch.randint(
                0,
                256,
                t.view(torch.uint8).shape,
                dtype=torch.uint8,
                generator=torch.Generator().manual_seed(num_blocks * 10 + i),
            )
        )
    return storage


def _block_bytes(storage: TensorStorage, block_id: int) -> bytes:
    layout = storage.layout
    return b"".join(
        storage.block_view(block_id, layer, outer).numpy().tobytes()
        for layer in range(layout.num_layers)
        for outer in range(layout.outer_dim)
    )


@pytest.mark.parametrize("num_ids", [1, 3, 20])
def test_plan_follows_storages_not_their_ids(num_ids: int) -> None:
    """Copies alternate between pairs of storages of different kinds and sizes, one pair is
    dropped and rebuilt (its ids may be reused) and one has its tensors replaced: every copy
    lands the source's bytes, so no plan is ever used for another pair."""
    src = _storage(LayoutKind.FULLY_CONTIGUOUS, 24)
    targets = [
        _storage(LayoutKind.LAYER_SEPARATE, 30),
        _storage(LayoutKind.FULLY_CONTIGUOUS, 26),
        _storage(LayoutKind.FULLY_CONTIGUOUS, 22, alignment=512),  # padded: one chunk per block
    ]
    src_ids = list(range(2, 2 + num_ids))
    for round_ in range(3):
        for target in targets:
            dst_ids = [(round_ * 5 + i) % target.layout.num_blocks for i in range(num_ids)]
            dst_ids = dst_ids[::-1] if round_ % 2 else dst_ids  # runs, then no runs
            copy_blocks(src, src_ids, target, dst_ids)
            for s, d in zip(src_ids, dst_ids, strict=True):
                assert _block_bytes(target, d) == _block_bytes(src, s)
        # a fresh storage in place of the first target (its id may be the old one's)
        targets[0].close()
        del targets[0]
        gc.collect()
        targets.insert(0, _storage(LayoutKind.LAYER_SEPARATE, 28 + round_, alignment=256))
        # the same object with new tensors (a different buffer): the plan must follow
        fresh = _storage(LayoutKind.FULLY_CONTIGUOUS, 26)
        targets[1].tensors = fresh.tensors
        targets[1].layout = fresh.layout


def test_plan_is_cached_per_pair_and_dropped_on_close() -> None:
    a = _storage(LayoutKind.FULLY_CONTIGUOUS, 8)
    b = _storage(LayoutKind.LAYER_SEPARATE, 8)
    c = _storage(LayoutKind.LAYER_SEPARATE, 8)
    plan = copy_plan.pair_plan(a, b)
    assert copy_plan.pair_plan(a, b) is plan
    assert copy_plan.pair_plan(a, c) is not plan
    assert copy_plan.pair_plan(b, a) is not plan
    b.close()
    # closing forgot the plan, so its views no longer hold b's memory
    assert all(e.plan is not plan for e in copy_plan._plans.values())
    a.close()
    c.close()
