"""Whole-block copies between any two storages of the same block geometry.

``copy_blocks`` moves every layer and outer (K, V) of each block ``src_ids[i]`` of one storage to
block ``dst_ids[i]`` of another: memory <-> memory (any mix of layout kinds, alignments, CPU or
CUDA tensors), memory <-> disk and disk <-> disk. It is pure torch/numpy; a compiled kernel may
replace the memory path later behind the same function.

How memory is moved. Each buffer is viewed, bit for bit, as ``(num_blocks, chunks, chunk_words)``
of the widest integer word (8, 4, 2 or 1 bytes) that divides the chunk size, the strides and the
buffer addresses, so padding is skipped and no value is ever converted. Two fully-contiguous sides
are copied in one step; otherwise both sides are split per layer. Pairs of ids that ascend
together form runs, copied one of two ways, chosen by measurement on this 2-core CPU (64 MiB
moved, strided or not):

* one ``copy_`` per run: memcpy speed plus about 4 us per call; wins from 16 KiB runs up
  (64 KiB: 11 ms vs 18 ms; 256 KiB: 8 ms vs 18 ms);
* one gather/scatter for all rows: numpy fancy indexing on CPU (4 KiB rows: 22 ms vs 62 ms for
  slices). torch ``index_select``/``index_copy_`` were as fast single-threaded but 20-40x slower
  when the two intra-op threads compete with another process for the cores, so they are used
  only for CUDA tensors.

Runs averaging at least ``SLICE_MIN_RUN_BYTES`` per buffer pair use slices, shorter ones the
gather.

Disk. A disk side goes through a page-aligned staging buffer laid out as the file is (block
stride, padding included): reads fill it with one ``preadv`` per run of adjacent file blocks, then
its rows are scattered; writes gather into it, then ``pwritev`` per run.

Invariants: ids are checked before anything is touched (range, equal lengths, no duplicate
destination); the geometry is checked even for empty id lists, which are otherwise a no-op; the
source is never modified; duplicate source ids are allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm.layout import LayoutKind, LayoutSpec
from fabric.kvbm.storage import DiskStorage, Storage, TensorStorage

logger = logging.getLogger(__name__)

SLICE_MIN_RUN_BYTES = 16 << 10
"""Average run size (bytes per buffer pair) from which per-run slice copies beat index ops."""

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclasses.dataclass(frozen=True, slots=True)
class _Side:
    """Tensors laid out by ``layout`` and the rows (block ids) taking part in one copy."""

    layout: LayoutSpec
    tensors: list[torch.Tensor]
    ids: np.ndarray


def copy_blocks(src: Storage, src_ids: Sequence[int], dst: Storage, dst_ids: Sequence[int]) -> None:
    """Copy whole blocks ``src_ids[i]`` of ``src`` to ``dst_ids[i]`` of ``dst``.

    Raises:
        LayoutMismatch: the layouts differ in block size, layers, outer dim, inner dim or dtype.
        InvalidInput: ids out of range, lists of unequal length, a repeated destination id, or a
            storage type other than ``TensorStorage`` / ``DiskStorage``.
        StorageError: disk I/O failed.
    """
    diff = src.layout.geometry_diff(dst.layout)
    if diff:
        details = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
        raise LayoutMismatch(f"cannot copy blocks between layouts that differ in {details}")
    source, target = _supported(src), _supported(dst)
    src_arr = src.layout.block_id_array(src_ids)
    dst_arr = dst.layout.block_id_array(dst_ids)
    if src_arr.size != dst_arr.size:
        raise InvalidInput(
            f"got {src_arr.size} source ids but {dst_arr.size} destination ids; they must pair up"
        )
    if np.unique(dst_arr).size != dst_arr.size:
        values, counts = np.unique(dst_arr, return_counts=True)
        raise InvalidInput(
            f"destination block id {int(values[counts > 1][0])} appears more than once; "
            "each destination block may be written once per copy"
        )
    if src_arr.size == 0:
        return
    logger.debug("copy %d blocks %s -> %s", src_arr.size, type(src).__name__, type(dst).__name__)
    src_side = _read_side(source, src_arr)
    if isinstance(target, DiskStorage):
        staging = target.staging_buffer(dst_arr.size)
        _copy_rows(src_side, _staging_side(target.layout, staging), same_storage=False)
        target.write_from(dst_arr, staging)
    else:
        dst_side = _Side(target.layout, target.tensors, dst_arr)
        _copy_rows(src_side, dst_side, same_storage=source is target)


def _supported(storage: Storage) -> TensorStorage | DiskStorage:
    if not isinstance(storage, TensorStorage | DiskStorage):
        raise InvalidInput(
            f"copy_blocks supports TensorStorage and DiskStorage, got {type(storage).__name__}"
        )
    return storage


def _staging_side(layout: LayoutSpec, staging: np.ndarray) -> _Side:
    num_rows = staging.size // layout.block_stride
    staging_layout = dataclasses.replace(layout, num_blocks=num_rows)
    return _Side(staging_layout, [torch.from_numpy(staging)], np.arange(num_rows))


def _read_side(storage: TensorStorage | DiskStorage, ids: np.ndarray) -> _Side:
    """The source as memory: the storage itself, or a staging buffer read from disk."""
    if isinstance(storage, TensorStorage):
        return _Side(storage.layout, storage.tensors, ids)
    staging = storage.staging_buffer(ids.size)
    storage.read_into(ids, staging)
    return _staging_side(storage.layout, staging)


def _copy_rows(src: _Side, dst: _Side, *, same_storage: bool) -> None:
    word = _word_size(src, dst)
    src_views = _split(src.layout, [_word_view(src.layout, t, word) for t in src.tensors], dst)
    dst_views = _split(dst.layout, [_word_view(dst.layout, t, word) for t in dst.tensors], src)
    starts = np.flatnonzero(
        (np.diff(src.ids, prepend=src.ids[0] - 2) != 1)
        | (np.diff(dst.ids, prepend=dst.ids[0] - 2) != 1)
    )
    bytes_per_pair = src.ids.size * src.layout.block_bytes // len(src_views)
    overlapping = same_storage and np.intersect1d(src.ids, dst.ids).size > 0
    if bytes_per_pair >= SLICE_MIN_RUN_BYTES * starts.size and not overlapping:
        ends = np.append(starts[1:], src.ids.size)
        runs = [
            (int(src.ids[s]), int(dst.ids[s]), int(e - s))
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        for sv, dv in zip(src_views, dst_views, strict=True):
            for s, d, n in runs:
                dv[d : d + n].copy_(sv[s : s + n])
        return
    for sv, dv in zip(src_views, dst_views, strict=True):
        if sv.device.type == dv.device.type == "cpu":
            dv.numpy()[dst.ids] = sv.numpy()[src.ids]
        else:
            rows = sv.index_select(0, torch.from_numpy(src.ids).to(sv.device))
            dv.index_copy_(0, torch.from_numpy(dst.ids).to(dv.device), rows.to(dv.device))


def _word_size(*sides: _Side) -> int:
    """Widest power-of-two word (<= 8 bytes) dividing every chunk, stride and buffer address."""
    g = 0
    for side in sides:
        g = math.gcd(g, side.layout.chunk_bytes, side.layout.block_stride)
        for t in side.tensors:
            g = math.gcd(g, t.data_ptr())
    return min(8, g & -g)


def _word_view(layout: LayoutSpec, buffer: torch.Tensor, word: int) -> torch.Tensor:
    """``buffer`` as ``(num_blocks, chunks_per_slot, chunk_words)`` integer words (aliasing)."""
    words = buffer.reshape(-1).view(torch.uint8).view(_WORD_DTYPES[word])
    return words.as_strided(
        (layout.num_blocks, layout.chunks_per_slot, layout.chunk_bytes // word),
        (layout.block_stride // word, layout.chunk_bytes // word, 1),
        words.storage_offset(),
    )


def _split(layout: LayoutSpec, views: list[torch.Tensor], other: _Side) -> list[torch.Tensor]:
    """One view per layer unless both sides are fully contiguous (then the one whole view)."""
    both_contiguous = (
        layout.kind is LayoutKind.FULLY_CONTIGUOUS
        and other.layout.kind is LayoutKind.FULLY_CONTIGUOUS
    )
    if both_contiguous or layout.kind is LayoutKind.LAYER_SEPARATE:
        return views
    (view,) = views
    return list(view.split(layout.outer_dim, dim=1))
