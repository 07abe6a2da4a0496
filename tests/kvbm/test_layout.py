"""LayoutSpec: validation, sizes, tensor shapes, adoption checks, regions and compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec, Region
from fabric.kvbm.tiers.storage import host_storage

FC = LayoutKind.FULLY_CONTIGUOUS
LS = LayoutKind.LAYER_SEPARATE


def spec(**overrides: object) -> LayoutSpec:
    fields: dict[str, object] = {
        "kind": FC,
        "num_blocks": 16,
        "num_layers": 3,
        "outer_dim": 2,
        "block_size": 4,
        "inner_dim": 8,
        "dtype": torch.float16,
    }
    fields.update(overrides)
    return LayoutSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "error", "needle"),
    [
        ("kind", "fully_contiguous", InvalidInput, "kind="),
        ("num_blocks", 0, InvalidInput, "num_blocks=0"),
        ("num_layers", -1, InvalidInput, "num_layers=-1"),
        ("block_size", 2.0, InvalidInput, "block_size=2.0"),
        ("inner_dim", True, InvalidInput, "inner_dim=True"),
        ("alignment", 0, InvalidInput, "alignment=0"),
        ("alignment", 48, InvalidInput, "power of two"),
        ("outer_dim", 3, LayoutMismatch, "outer_dim=3"),
        ("outer_dim", 0, LayoutMismatch, "outer_dim=0"),
        ("dtype", torch.int32, LayoutMismatch, "float16"),
    ],
)
def test_validation_names_the_bad_field(
    field: str, value: object, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        spec(**{field: value})


def test_sizes_fully_contiguous_and_layer_separate() -> None:
    fc = spec()
    assert fc.chunk_bytes == 4 * 8 * 2
    assert fc.block_bytes == 3 * 2 * 64
    assert (fc.num_buffers, fc.slot_bytes, fc.block_stride) == (1, 384, 384)
    assert fc.buffer_bytes == 16 * 384 and not fc.padded
    ls = spec(kind=LS)
    assert (ls.num_buffers, ls.slot_bytes, ls.block_stride) == (3, 128, 128)
    assert ls.buffer_bytes == 16 * 128 and ls.total_bytes == 3 * 16 * 128


def test_alignment_pads_each_slot() -> None:
    fc = spec(alignment=256)
    assert (fc.block_stride, fc.buffer_bytes, fc.padded) == (512, 16 * 512, True)
    ls = spec(kind=LS, alignment=256)
    assert (ls.block_stride, ls.buffer_bytes) == (256, 16 * 256)
    assert spec(alignment=128).padded is False  # 384 is already a multiple of 128


def test_tensor_shapes() -> None:
    assert spec().tensor_shapes() == [(16, 3, 2, 4, 8)]
    assert spec(kind=LS, outer_dim=1).tensor_shapes() == [(16, 1, 4, 8)] * 3
    # Padded: rows of block_stride bytes in the layout's dtype.
    assert spec(alignment=256).tensor_shapes() == [(16, 256)]
    assert spec(kind=LS, alignment=1024, dtype=torch.float32).tensor_shapes() == [(16, 256)] * 3


@pytest.mark.parametrize("kind", [FC, LS])
@pytest.mark.parametrize(("inner_dim", "alignment"), [(8, 1), (5, 64)])
def test_check_tensors_accepts_matching_tensors(
    kind: LayoutKind, inner_dim: int, alignment: int
) -> None:
    # torch's CPU allocator starts tensors on 64 bytes; (5, 64) pads every slot.
    layout = spec(kind=kind, inner_dim=inner_dim, alignment=alignment)
    assert layout.padded == (alignment == 64)
    layout.check_tensors([torch.zeros(s, dtype=layout.dtype) for s in layout.tensor_shapes()])


def test_check_tensors_accepts_engine_shaped_pages() -> None:
    # vLLM-CPU style page per layer: [num_blocks, kv_heads, block_size, 2 * head_size].
    layout = spec(kind=LS, outer_dim=1, inner_dim=2 * 2 * 4)
    layout.check_tensors([torch.zeros(16, 2, 4, 8, dtype=torch.float16) for _ in range(3)])


def test_check_tensors_rejects_contradictions() -> None:
    layout = spec(kind=LS)
    good = [torch.zeros(s, dtype=layout.dtype) for s in layout.tensor_shapes()]
    with pytest.raises(LayoutMismatch, match="got 2 tensors"):
        layout.check_tensors(good[:2])
    with pytest.raises(LayoutMismatch, match=r"dtype torch\.float32"):
        layout.check_tensors([*good[:2], good[2].float()])
    with pytest.raises(LayoutMismatch, match="shape"):
        layout.check_tensors([*good[:2], torch.zeros(15, 2, 4, 8, dtype=torch.float16)])
    with pytest.raises(LayoutMismatch, match="bytes"):
        layout.check_tensors([*good[:2], torch.zeros(16, 2, 4, 9, dtype=torch.float16)])
    with pytest.raises(LayoutMismatch, match="blocks outermost"):
        # Right size, but layer/outer first: blocks are not the outermost dimension.
        layout.check_tensors([*good[:2], torch.zeros(2, 16, 4, 8, dtype=torch.float16)])
    transposed = torch.zeros(16, 2, 8, 4, dtype=torch.float16).transpose(2, 3)
    with pytest.raises(LayoutMismatch, match="not contiguous"):
        layout.check_tensors([*good[:2], transposed])
    with pytest.raises(LayoutMismatch, match=r"not a torch\.Tensor"):
        layout.check_tensors([*good[:2], np.zeros((16, 2, 4, 8), dtype=np.float16)])  # type: ignore[list-item]


def test_check_tensors_rejects_misaligned_start() -> None:
    layout = spec(alignment=64)
    backing = torch.zeros(16 * 384 // 2 + 64, dtype=torch.float16)
    start = (-backing.data_ptr() % 64) // 2 + 1  # one element past an aligned address
    shifted = backing[start : start + 16 * 192].view(16, 3, 2, 4, 8)
    with pytest.raises(LayoutMismatch, match="alignment=64"):
        layout.check_tensors([shifted])


def test_regions_coalesce_ascending_runs_only() -> None:
    layout = spec()
    bb = layout.block_bytes
    assert layout.regions([3, 4, 5]) == [Region(0, 3 * bb, 3 * bb)]
    assert layout.regions([5, 4, 3]) == [
        Region(0, 5 * bb, bb),
        Region(0, 4 * bb, bb),
        Region(0, 3 * bb, bb),
    ]
    assert layout.regions([9, 10, 2, 3, 3]) == [
        Region(0, 9 * bb, 2 * bb),
        Region(0, 2 * bb, 2 * bb),
        Region(0, 3 * bb, bb),
    ]
    assert layout.regions([]) == []


def test_regions_layer_separate_are_buffer_major() -> None:
    layout = spec(kind=LS)
    slot = layout.slot_bytes
    assert layout.regions([7, 1, 2]) == [
        Region(buffer, offset, length)
        for buffer in range(3)
        for offset, length in ((7 * slot, slot), (1 * slot, 2 * slot))
    ]


@pytest.mark.parametrize("kind", [FC, LS])
def test_regions_skip_padding(kind: LayoutKind) -> None:
    layout = spec(kind=kind, alignment=1024)
    regions = layout.regions([3, 4, 5])
    assert len(regions) == 3 * layout.num_buffers
    assert all(r.offset % 1024 == 0 and r.length == layout.slot_bytes for r in regions)
    assert [r.offset for r in regions[:3]] == [3 * 1024, 4 * 1024, 5 * 1024]


def test_regions_many_blocks_vectorised() -> None:
    layout = spec(num_blocks=20_000)
    ids = np.concatenate([np.arange(0, 10_000), np.arange(15_000, 20_000)])
    array = layout.region_array(ids)
    assert array.tolist() == [
        [0, 0, 10_000 * layout.block_bytes],
        [0, 15_000 * layout.block_bytes, 5_000 * layout.block_bytes],
    ]


def test_regions_reject_bad_ids() -> None:
    layout = spec()
    with pytest.raises(InvalidInput, match="block id 16 is out of range"):
        layout.regions([1, 16])
    with pytest.raises(InvalidInput, match="block id -1"):
        layout.regions([-1])
    with pytest.raises(InvalidInput, match="ints"):
        layout.regions([1.5])  # type: ignore[list-item]


@pytest.mark.parametrize("kind", [FC, LS])
@pytest.mark.parametrize("alignment", [1, 512])
def test_regions_cover_exactly_the_blocks_bytes(kind: LayoutKind, alignment: int) -> None:
    torch.manual_seed(0)
    layout = spec(kind=kind, alignment=alignment)
    storage = host_storage(layout)
    for t in storage.tensors:
        t.copy_(torch.randn(t.shape))
    raw = [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in storage.tensors]
    ids = [6, 7, 8, 2]
    got = {
        b: b"".join(
            raw[r.buffer_index][r.offset : r.offset + r.length] for r in layout.regions([b])
        )
        for b in ids
    }
    for b in ids:
        chunks = [
            storage.block_view(b, layer, outer).view(torch.uint8).numpy().tobytes()
            for layer in range(layout.num_layers)
            for outer in range(layout.outer_dim)
        ]
        assert got[b] == b"".join(chunks)
    run = b"".join(raw[r.buffer_index][r.offset : r.offset + r.length] for r in layout.regions(ids))
    assert len(run) == len(ids) * layout.block_bytes
    storage.close()


def test_compat_fields_ignore_pool_size_kind_and_alignment() -> None:
    base = spec(dtype=torch.bfloat16)
    assert base.compat_fields() == {
        "block_size": 4,
        "num_layers": 3,
        "outer_dim": 2,
        "inner_dim": 8,
        "dtype": "bfloat16",
    }
    other = spec(dtype=torch.bfloat16, kind=LS, num_blocks=99, alignment=4096)
    assert other.compat_fields() == base.compat_fields()
    assert base.same_geometry(other) and other.same_geometry(base)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 8),
        ("num_layers", 2),
        ("outer_dim", 1),
        ("inner_dim", 16),
        ("dtype", torch.float32),
    ],
)
def test_compat_fields_differ_on_geometry(field: str, value: object) -> None:
    base, other = spec(), spec(**{field: value})
    assert base.compat_fields() != other.compat_fields()
    assert not base.same_geometry(other)
    assert list(base.geometry_diff(other)) == [field]


def test_chunk_location_rejects_out_of_range() -> None:
    with pytest.raises(InvalidInput, match="layer=3"):
        spec().chunk_location(3, 0)
    assert spec().chunk_location(2, 1) == (0, 5)
    assert spec(kind=LS).chunk_location(2, 1) == (2, 1)
