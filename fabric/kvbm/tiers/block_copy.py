"""Whole-block copies between any two storages of the same block geometry, and staging packs.

``copy_blocks`` moves every layer and outer (K, V) of each block ``src_ids[i]`` of one storage to
block ``dst_ids[i]`` of another: memory <-> memory (any mix of layout kinds, alignments, CPU or
CUDA tensors), memory <-> disk and disk <-> disk. ``gather_to_staging`` packs scattered blocks
back to back into one uint8 buffer (block ``i`` at ``i * block_bytes``, fully-contiguous order
``[layer][outer][token][inner]``, no padding) and ``scatter_from_staging`` unpacks such a buffer,
so a transfer agent can move many small scattered blocks as one descriptor.

How memory is moved. Both sides are cut into buffer pairs: one pair when both are fully
contiguous, else one per layer. Pairs of ids that ascend together form runs. On CPU there are
three ways, chosen by measurement (``python -m fabric.bench copy``, figures in
docs/benchmarks.md: native against the fallback and memcpy, per block size, layout pair and id
pattern). Hence:

* native (``kernels.batched_copy``): one call per buffer pair, one memcpy per block (per run
  when both sides hold rows back to back), no Python step per block, single-threaded. Used
  for runs averaging under ``NATIVE_MAX_RUN_BYTES`` per buffer pair, and for every run when
  torch is limited to one thread (as a process sharing these cores should be).
* one ``copy_`` per run: a few microseconds per call, and torch spreads a long copy over both
  cores: faster than native when the other core is free, much slower when it is not (compare
  ``python -m fabric.bench copy --threads 2`` on an idle and a busy machine). Used for runs of
  ``NATIVE_MAX_RUN_BYTES`` and more when torch may use two threads (torch's own choice, as
  before the native kernel). Fully contiguous -> layer separate contiguous copies of 16 KiB
  blocks are the one measured case where slices stay ahead with one thread.
* one gather/scatter for all rows (numpy fancy indexing on word views): the only way that is
  correct when source and destination blocks overlap inside one storage (it reads everything
  before writing), and the short-run path when the extension is not available (then runs of
  ``SLICE_MIN_RUN_BYTES`` and more use slices).

CUDA tensors (unmeasured here: no GPU) use slices for long runs and torch
``index_select``/``index_copy_`` otherwise. Every memory view is taken bit for bit as the widest
integer word (8, 4, 2 or 1 bytes) dividing chunk size, strides and addresses, or as bytes, so
padding is skipped and no value is ever converted.

Disk. A disk side goes through a page-aligned staging buffer laid out as the file is (block
stride, padding included): reads fill it with one ``preadv`` per run of adjacent file blocks, then
its rows are scattered; writes gather into it, then ``pwritev`` per run.

Invariants: ids are checked before anything is touched (range, equal lengths, no duplicate
destination); the geometry is checked even for empty id lists, which are otherwise a no-op; the
source is never modified; duplicate source ids are allowed; every path writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers import kernels
from fabric.kvbm.tiers.storage import DiskStorage, Storage, TensorStorage
from fabric.transfer.memory import MemoryKind

logger = logging.getLogger(__name__)

SLICE_MIN_RUN_BYTES = 16 << 10
"""Without the native kernels: average run (bytes per buffer pair) from which slices beat index
ops (64 KiB: 11 ms vs 18 ms; 256 KiB: 8 ms vs 18 ms; 4 KiB: 62 ms vs 22 ms)."""

NATIVE_MAX_RUN_BYTES = 512 << 10
"""With the native kernels on CPU and torch on two threads: average run (bytes per buffer pair)
from which slices are used instead (from 512 KiB runs two-thread slices reached 7-8 GB/s against
native's 5-6 with the other core free; at 128-256 KiB native still led)."""

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@dataclasses.dataclass(frozen=True, slots=True)
class _Side:
    """Tensors laid out by ``layout`` and the rows (block ids) taking part in one copy."""

    layout: LayoutSpec
    tensors: list[torch.Tensor]
    ids: np.ndarray


def copy_blocks(
    src: Storage,
    src_ids: Sequence[int] | np.ndarray,
    dst: Storage,
    dst_ids: Sequence[int] | np.ndarray,
) -> None:
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


def gather_to_staging(
    storage: Storage, block_ids: Sequence[int] | np.ndarray, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Pack blocks ``block_ids`` of ``storage`` back to back into one uint8 buffer.

    Block ``block_ids[i]`` lands at ``i * layout.block_bytes`` in fully-contiguous order
    (``[layer][outer][token][inner]``, no padding), the order ``scatter_from_staging`` reads.

    Args:
        out: where to pack: a contiguous uint8 tensor of at least ``len(block_ids) *
            block_bytes`` bytes on any device (e.g. a buffer registered once with a transfer
            agent). None: a new tensor on the storage's device (CPU for disk).

    Returns:
        The packed bytes: the first ``len(block_ids) * block_bytes`` bytes of ``out``, or the
        new tensor.

    Raises:
        InvalidInput: an id is out of range, or ``out`` is not a large enough contiguous uint8
            tensor.
        StorageError: reading a disk storage failed.
    """
    supported = _supported(storage)
    layout = storage.layout
    ids = layout.block_id_array(block_ids)
    nbytes = ids.size * layout.block_bytes
    if out is None:
        device = supported.tensors[0].device if isinstance(supported, TensorStorage) else "cpu"
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    packed = _packed_bytes(out, nbytes, "out")
    if ids.size:
        copy_blocks(supported, ids, _packed_storage(layout, packed), np.arange(ids.size))
    return packed


def scatter_from_staging(
    staging: torch.Tensor, storage: Storage, block_ids: Sequence[int] | np.ndarray
) -> None:
    """Unpack a ``gather_to_staging`` buffer: its block ``i`` becomes block ``block_ids[i]``.

    Only the first ``len(block_ids) * block_bytes`` bytes of ``staging`` are read.

    Raises:
        InvalidInput: an id is out of range or repeated, or ``staging`` is not a large enough
            contiguous uint8 tensor.
        StorageError: writing a disk storage failed.
    """
    supported = _supported(storage)
    layout = storage.layout
    ids = layout.block_id_array(block_ids)
    packed = _packed_bytes(staging, ids.size * layout.block_bytes, "staging")
    if ids.size:
        copy_blocks(_packed_storage(layout, packed), np.arange(ids.size), supported, ids)


def _packed_bytes(buffer: torch.Tensor, nbytes: int, what: str) -> torch.Tensor:
    """The first ``nbytes`` of a contiguous uint8 tensor, flat."""
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8:
        kind = buffer.dtype if isinstance(buffer, torch.Tensor) else type(buffer).__name__
        raise InvalidInput(f"{what} must be a uint8 tensor, got {kind}")
    if not buffer.is_contiguous():
        raise InvalidInput(f"{what} must be contiguous")
    if buffer.numel() < nbytes:
        raise InvalidInput(
            f"{what} holds {buffer.numel()} bytes; these blocks need {nbytes} (block_bytes each)"
        )
    return buffer.reshape(-1)[:nbytes]


def _packed_storage(layout: LayoutSpec, packed: torch.Tensor) -> TensorStorage:
    """``packed`` (flat uint8, whole blocks) as a storage: fully contiguous, no padding."""
    packed_layout = dataclasses.replace(
        layout,
        kind=LayoutKind.FULLY_CONTIGUOUS,
        num_blocks=packed.numel() // layout.block_bytes,
        alignment=1,
    )
    kind = MemoryKind.VRAM if packed.device.type == "cuda" else MemoryKind.DRAM
    # Moved as bytes: copy.py's views never read the tensor's dtype, only its bytes.
    return TensorStorage(packed_layout, [packed], kind)


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
    overlapping = same_storage and np.intersect1d(src.ids, dst.ids).size > 0
    starts = _run_starts(src.ids, dst.ids)
    num_pairs = 1 if _both_contiguous(src.layout, dst.layout) else src.layout.num_layers
    bytes_per_pair = src.ids.size * src.layout.block_bytes // num_pairs
    on_cpu = all(t.device.type == "cpu" for t in (*src.tensors, *dst.tensors))
    short_runs = bytes_per_pair < NATIVE_MAX_RUN_BYTES * starts.size
    if (
        on_cpu
        and not overlapping
        and (short_runs or torch.get_num_threads() == 1)
        and kernels.native_available()
    ):
        _batched_copy_rows(src, dst, starts)
        return
    word = _word_size(src, dst)
    src_views = _split(src.layout, [_word_view(src.layout, t, word) for t in src.tensors], dst)
    dst_views = _split(dst.layout, [_word_view(dst.layout, t, word) for t in dst.tensors], src)
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


def _run_starts(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    """Positions where a run of pairs ascending together by one (in both id lists) starts."""
    return np.flatnonzero(
        (np.diff(src_ids, prepend=src_ids[0] - 2) != 1)
        | (np.diff(dst_ids, prepend=dst_ids[0] - 2) != 1)
    )


def _batched_copy_rows(src: _Side, dst: _Side, starts: np.ndarray) -> None:
    """One native batched copy per buffer pair.

    Each pair copies one row per block, or one chunk per run when both sides hold their rows
    back to back (no padding, no per-layer split).
    """
    src_rows = _byte_rows(src.layout, src.tensors, dst)
    dst_rows = _byte_rows(dst.layout, dst.tensors, src)
    row_bytes = src.layout.block_bytes // len(src_rows)
    src_stride, dst_stride = src.layout.block_stride, dst.layout.block_stride
    if src_stride == dst_stride == row_bytes:
        run_lengths = np.diff(starts, append=src.ids.size)
        src_offsets = src.ids[starts] * src_stride
        dst_offsets = dst.ids[starts] * dst_stride
        lengths = torch.from_numpy(run_lengths * row_bytes)
    else:
        src_offsets, dst_offsets = src.ids * src_stride, dst.ids * dst_stride
        lengths = torch.full((src.ids.size,), row_bytes, dtype=torch.int64)
    for (src_bytes, src_base), (dst_bytes, dst_base) in zip(src_rows, dst_rows, strict=True):
        kernels.batched_copy(
            src_bytes,
            dst_bytes,
            torch.from_numpy(src_offsets + src_base),
            torch.from_numpy(dst_offsets + dst_base),
            lengths,
        )


def _byte_rows(
    layout: LayoutSpec, tensors: list[torch.Tensor], other: _Side
) -> list[tuple[torch.Tensor, int]]:
    """Per buffer pair (cut as ``_split`` cuts): the buffer as flat bytes, and the offset of the
    pair's row inside each slot."""
    flats = [t.reshape(-1).view(torch.uint8) for t in tensors]
    if _both_contiguous(layout, other.layout) or layout.kind is LayoutKind.LAYER_SEPARATE:
        return [(flat, 0) for flat in flats]
    (flat,) = flats
    layer_bytes = layout.outer_dim * layout.chunk_bytes
    return [(flat, layer * layer_bytes) for layer in range(layout.num_layers)]


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
    if _both_contiguous(layout, other.layout) or layout.kind is LayoutKind.LAYER_SEPARATE:
        return views
    (view,) = views
    return list(torch.split(view, layout.outer_dim, dim=1))


def _both_contiguous(a: LayoutSpec, b: LayoutSpec) -> bool:
    return a.kind is b.kind is LayoutKind.FULLY_CONTIGUOUS
