"""One contract suite over every storage: what a pool, a copy and a transfer agent rely on."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers.block_copy import copy_blocks
from fabric.kvbm.tiers.storage import (
    DiskStorage,
    MemoryKind,
    Storage,
    adopt_tensors,
    device_storage,
    host_storage,
)

NUM_BLOCKS = 8


def layout(kind: LayoutKind) -> LayoutSpec:
    return LayoutSpec(kind, NUM_BLOCKS, 2, 2, 4, 16, torch.float16, alignment=64)


def _adopted(kind: LayoutKind, tmp: Path) -> Storage:
    spec = layout(kind)
    reference = device_storage(spec)
    tensors = [t.clone() for t in reference.tensors]  # an engine's own tensors
    reference.close()
    return adopt_tensors(spec, tensors)


FACTORIES: dict[str, Callable[[Path], Storage]] = {
    "device-fc": lambda tmp: device_storage(layout(LayoutKind.FULLY_CONTIGUOUS)),
    "device-ls": lambda tmp: device_storage(layout(LayoutKind.LAYER_SEPARATE)),
    "host-ls": lambda tmp: host_storage(layout(LayoutKind.LAYER_SEPARATE)),
    "host-shared": lambda tmp: host_storage(
        layout(LayoutKind.FULLY_CONTIGUOUS), shared_name=f"fabric-test-{uuid.uuid4().hex[:12]}"
    ),
    "adopted-ls": lambda tmp: _adopted(LayoutKind.LAYER_SEPARATE, tmp),
    "disk": lambda tmp: DiskStorage(layout(LayoutKind.FULLY_CONTIGUOUS), tmp),
}


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    built = FACTORIES[request.param](tmp_path)
    yield built
    built.close()


def test_buffers_describe_the_layout(storage: Storage) -> None:
    buffers = storage.buffers()
    assert len(buffers) == storage.layout.num_buffers
    assert all(b.nbytes == storage.layout.buffer_bytes for b in buffers)
    assert all(b.kind is storage.kind for b in buffers)
    if storage.kind is MemoryKind.FILE:
        assert all(b.path for b in buffers)
    else:
        assert all(b.address % storage.layout.alignment == 0 for b in buffers)


def test_blocks_round_trip_through_the_storage(storage: Storage) -> None:
    torch.manual_seed(1)
    source = device_storage(layout(LayoutKind.FULLY_CONTIGUOUS))
    back = device_storage(layout(LayoutKind.LAYER_SEPARATE))
    try:
        for t in source.tensors:
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
        ids = [5, 0, 3, 4]
        copy_blocks(source, ids, storage, [1, 2, 6, 7])
        copy_blocks(storage, [1, 2, 6, 7], back, [0, 1, 2, 3])
        for i, block in enumerate(ids):
            for layer in range(2):
                for outer in range(2):
                    assert torch.equal(
                        back.block_view(i, layer, outer), source.block_view(block, layer, outer)
                    )
    finally:
        source.close()
        back.close()


def test_close_is_idempotent(storage: Storage) -> None:
    storage.close()
    storage.close()
