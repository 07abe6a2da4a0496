"""copy_blocks: byte-exact round trips between every pair of storages, and refused inputs.

Blocks are written and read back here through ``block_view`` (memory) and plain file reads at
``block * block_stride`` (disk), never through ``copy_blocks`` itself.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest
import torch

import fabric.kvbm.tiers.block_copy as copy_module
from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers.block_copy import copy_blocks
from fabric.kvbm.tiers.storage import DiskStorage, TensorStorage, device_storage, host_storage

NUM_BLOCKS = 12


class Where(Enum):
    FC = "fc"
    LS = "ls"
    DISK = "disk"


# (num_layers, outer_dim, block_size, inner_dim, dtype)
GEOMETRIES = {
    "kv": (3, 2, 4, 8, torch.float16),
    "joined": (2, 1, 4, 16, torch.bfloat16),
    "odd-bytes": (2, 2, 5, 3, torch.int8),  # 15-byte chunks: copied as single bytes
}
ID_PATTERNS = [
    ([2, 3, 4, 5], [6, 7, 8, 9]),  # one run
    ([11, 0, 7, 3], [1, 10, 2, 5]),  # permuted
    ([1, 3, 5], [0, 1, 2]),  # strided source, contiguous destination
    ([6, 7, 8], [10, 2, 4]),  # contiguous source, scattered destination
    ([4, 4, 9], [11, 3, 4]),  # a source block copied twice
    ([9, 10, 11], [9, 10, 11]),
]


def make_layout(geometry: str, kind: LayoutKind, alignment: int, num_blocks: int) -> LayoutSpec:
    num_layers, outer_dim, block_size, inner_dim, dtype = GEOMETRIES[geometry]
    return LayoutSpec(
        kind, num_blocks, num_layers, outer_dim, block_size, inner_dim, dtype, alignment
    )


def make(
    where: Where, geometry: str, alignment: int, tmp_path: Path, num_blocks: int = NUM_BLOCKS
) -> TensorStorage | DiskStorage:
    kind = LayoutKind.LAYER_SEPARATE if where is Where.LS else LayoutKind.FULLY_CONTIGUOUS
    layout = make_layout(geometry, kind, alignment, num_blocks)
    if where is Where.DISK:
        return DiskStorage(layout, tmp_path)
    return host_storage(layout) if where is Where.FC else device_storage(layout)


def chunks(storage: TensorStorage, block: int) -> list[torch.Tensor]:
    layout = storage.layout
    return [
        storage.block_view(block, layer, outer).view(torch.uint8).reshape(-1)
        for layer in range(layout.num_layers)
        for outer in range(layout.outer_dim)
    ]


def read_block(storage: TensorStorage | DiskStorage, block: int) -> bytes:
    if isinstance(storage, TensorStorage):
        return b"".join(c.numpy().tobytes() for c in chunks(storage, block))
    layout = storage.layout
    with open(storage.path, "rb") as f:
        f.seek(block * layout.block_stride)
        return f.read(layout.block_bytes)


def write_block(storage: TensorStorage | DiskStorage, block: int, data: torch.Tensor) -> None:
    if isinstance(storage, TensorStorage):
        for chunk, piece in zip(
            chunks(storage, block), data.split(storage.layout.chunk_bytes), strict=True
        ):
            chunk.copy_(piece)
        return
    with open(storage.path, "r+b") as f:
        f.seek(block * storage.layout.block_stride)
        f.write(data.numpy().tobytes())


def fill_random(storage: TensorStorage | DiskStorage, seed: int) -> dict[int, bytes]:
    torch.manual_seed(seed)
    layout = storage.layout
    data = torch.randint(0, 256, (layout.num_blocks, layout.block_bytes), dtype=torch.uint8)
    for block in range(layout.num_blocks):
        write_block(storage, block, data[block])
    return {b: data[b].numpy().tobytes() for b in range(layout.num_blocks)}


def contents(storage: TensorStorage | DiskStorage) -> dict[int, bytes]:
    return {b: read_block(storage, b) for b in range(storage.layout.num_blocks)}


@pytest.fixture(params=["slices", "index"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force either strategy of the memory copy, whatever the run sizes."""
    threshold = 0 if request.param == "slices" else 1 << 62
    monkeypatch.setattr(copy_module, "SLICE_MIN_RUN_BYTES", threshold)
    return request.param


@pytest.mark.usefixtures("copy_path")
@pytest.mark.parametrize("src_where", list(Where), ids=lambda w: w.value)
@pytest.mark.parametrize("dst_where", list(Where), ids=lambda w: w.value)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("alignments", [(1, 1), (256, 1), (1, 4096)], ids=str)
def test_round_trip_between_every_pair(
    src_where: Where,
    dst_where: Where,
    geometry: str,
    alignments: tuple[int, int],
    tmp_path: Path,
) -> None:
    src = make(src_where, geometry, alignments[0], tmp_path)
    dst = make(dst_where, geometry, alignments[1], tmp_path)
    try:
        src_blocks = fill_random(src, seed=1)
        expected = fill_random(dst, seed=2)
        for src_ids, dst_ids in ID_PATTERNS:
            copy_blocks(src, src_ids, dst, dst_ids)
            expected.update({d: src_blocks[s] for s, d in zip(src_ids, dst_ids, strict=True)})
            assert contents(dst) == expected, (src_ids, dst_ids)
        assert contents(src) == src_blocks  # the source is never modified
    finally:
        src.close()
        dst.close()


def test_disk_to_memory_after_memory_to_disk(tmp_path: Path) -> None:
    host = make(Where.FC, "kv", 1, tmp_path, num_blocks=64)
    disk = make(Where.DISK, "kv", 4096, tmp_path, num_blocks=32)
    back = make(Where.LS, "kv", 64, tmp_path, num_blocks=40)
    try:
        original = fill_random(host, seed=3)
        host_ids = [60, 61, 62, 63, 5, 17, 2, 40]
        disk_ids = [0, 1, 2, 3, 31, 30, 8, 9]
        copy_blocks(host, host_ids, disk, disk_ids)
        back_ids = [39, 0, 1, 2, 10, 11, 12, 20]
        copy_blocks(disk, disk_ids, back, back_ids)
        for h, b in zip(host_ids, back_ids, strict=True):
            assert read_block(back, b) == original[h]
    finally:
        for storage in (host, disk, back):
            storage.close()


@pytest.mark.usefixtures("copy_path")
def test_overlapping_copy_inside_one_storage(tmp_path: Path) -> None:
    pool = make(Where.FC, "kv", 1, tmp_path)
    before = fill_random(pool, seed=4)
    copy_blocks(pool, [0, 1, 2], pool, [1, 2, 3])
    after = contents(pool)
    assert [after[1], after[2], after[3]] == [before[0], before[1], before[2]]
    assert after[0] == before[0] and after[4] == before[4]


def test_large_blocks_use_the_measured_default(tmp_path: Path) -> None:
    # 64 KiB blocks (slices) and 1 KiB ones (index ops) through the real threshold.
    for inner_dim, num_layers in ((1024, 4), (32, 2)):
        layouts = [
            LayoutSpec(kind, 16, num_layers, 2, 4, inner_dim, torch.float32)
            for kind in (LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE)
        ]
        src, dst = host_storage(layouts[0]), host_storage(layouts[1])
        blocks = fill_random(src, seed=5)
        copy_blocks(src, [3, 4, 5, 0], dst, [0, 1, 2, 15])
        assert [read_block(dst, b) for b in (0, 1, 2, 15)] == [blocks[b] for b in (3, 4, 5, 0)]


@pytest.mark.parametrize("dst_where", [Where.FC, Where.DISK], ids=lambda w: w.value)
def test_empty_id_lists_are_a_no_op(dst_where: Where, tmp_path: Path) -> None:
    src = make(Where.LS, "kv", 1, tmp_path)
    dst = make(dst_where, "kv", 1, tmp_path)
    before = fill_random(dst, seed=6)
    copy_blocks(src, [], dst, [])
    assert contents(dst) == before
    dst.close()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"inner_dim": 16}, "inner_dim: 8 vs 16"),
        ({"num_layers": 2}, "num_layers: 3 vs 2"),
        ({"outer_dim": 1}, "outer_dim: 2 vs 1"),
        ({"block_size": 8}, "block_size: 4 vs 8"),
        ({"dtype": torch.bfloat16}, "dtype: float16 vs bfloat16"),
    ],
)
def test_mismatched_geometry_is_refused(change: dict[str, object], needle: str) -> None:
    fields: dict[str, object] = {
        "kind": LayoutKind.FULLY_CONTIGUOUS,
        "num_blocks": 4,
        "num_layers": 3,
        "outer_dim": 2,
        "block_size": 4,
        "inner_dim": 8,
        "dtype": torch.float16,
    }
    src = host_storage(LayoutSpec(**fields))  # type: ignore[arg-type]
    dst = host_storage(LayoutSpec(**{**fields, **change}))  # type: ignore[arg-type]
    with pytest.raises(LayoutMismatch, match=needle):
        copy_blocks(src, [0], dst, [0])
    with pytest.raises(LayoutMismatch, match=needle):
        copy_blocks(src, [], dst, [])


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "needle"),
    [
        ([0, 12], [0, 1], "block id 12 is out of range"),
        ([0, 1], [-1, 1], "block id -1 is out of range"),
        ([0, 1, 2], [0, 1], "3 source ids but 2 destination ids"),
        ([0, 1, 2], [4, 5, 4], "destination block id 4 appears more than once"),
        ([0.0], [1], "ints"),
    ],
)
def test_bad_ids_are_refused_before_copying(
    src_ids: list[int], dst_ids: list[int], needle: str, tmp_path: Path
) -> None:
    src = make(Where.FC, "kv", 1, tmp_path)
    dst = make(Where.DISK, "kv", 1, tmp_path)
    fill_random(src, seed=7)
    before = fill_random(dst, seed=8)
    with pytest.raises(InvalidInput, match=needle):
        copy_blocks(src, src_ids, dst, dst_ids)
    assert contents(dst) == before
    dst.close()


def test_unknown_storage_type_is_refused(tmp_path: Path) -> None:
    class Foreign:
        def __init__(self, layout: LayoutSpec) -> None:
            self.layout = layout

    src = make(Where.FC, "kv", 1, tmp_path)
    with pytest.raises(InvalidInput, match="got Foreign"):
        copy_blocks(src, [0], Foreign(src.layout), [0])  # type: ignore[arg-type]
