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

Per call. What depends only on the (source, target) storage pair (geometry check, buffer pairs,
byte views, strides) is a cached ``copy_plan.PairPlan``; batches of up to ``SMALL_BATCH`` blocks
are checked and described with Python ints (no numpy per call): a one-block copy costs a few
microseconds of set-up instead of tens.

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
from collections.abc import Sequence

import numpy as np
import torch

from fabric.errors import InvalidInput, LayoutMismatch
from fabric.kvbm.core.layout import LayoutKind, LayoutSpec
from fabric.kvbm.tiers import kernels
from fabric.kvbm.tiers.copy_plan import PairPlan, build_plan, pair_plan
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

SMALL_BATCH = 8
"""Batches of up to this many blocks are checked and described with Python ints: numpy's
per-call cost (``asarray``, ``unique``, ``diff``: a few microseconds each) exceeds the work."""


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
    source, target = _supported(src), _supported(dst)
    plan: PairPlan | None = None
    if isinstance(source, TensorStorage) and isinstance(target, TensorStorage):
        plan = pair_plan(source, target)  # checks the geometry
    else:
        diff = src.layout.geometry_diff(dst.layout)
        if diff:
            details = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
            raise LayoutMismatch(f"cannot copy blocks between layouts that differ in {details}")
    src_arr = _id_array(src.layout, src_ids)
    dst_arr = _id_array(dst.layout, dst_ids)
    if src_arr.size != dst_arr.size:
        raise InvalidInput(
            f"got {src_arr.size} source ids but {dst_arr.size} destination ids; they must pair up"
        )
    _check_unique(dst_arr)
    if src_arr.size == 0:
        return
    logger.debug("copy %d blocks %s -> %s", src_arr.size, type(src).__name__, type(dst).__name__)
    if plan is not None:
        _copy_rows(plan, src_arr, dst_arr, same_storage=source is target)
    elif isinstance(target, TensorStorage):
        assert isinstance(source, DiskStorage)
        _copy_from_disk(source, src_arr, target, dst_arr)
    else:
        _copy_to_disk(source, src_arr, target, dst_arr)


def _id_array(layout: LayoutSpec, block_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``layout.block_id_array`` with a short cut for a small list of Python ints."""
    if isinstance(block_ids, list | tuple | range) and 0 < len(block_ids) <= SMALL_BATCH:
        num_blocks = layout.num_blocks
        if all(type(i) is int and 0 <= i < num_blocks for i in block_ids):
            return np.array(block_ids, dtype=np.int64)
    return layout.block_id_array(block_ids)


def _check_unique(dst_arr: np.ndarray) -> None:
    if dst_arr.size <= SMALL_BATCH:
        ids = dst_arr.tolist()
        if len(set(ids)) == len(ids):
            return
    elif np.unique(dst_arr).size == dst_arr.size:
        return
    values, counts = np.unique(dst_arr, return_counts=True)
    raise InvalidInput(
        f"destination block id {int(values[counts > 1][0])} appears more than once; "
        "each destination block may be written once per copy"
    )


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


def _staging_storage(layout: LayoutSpec, staging: np.ndarray) -> TensorStorage:
    """A disk staging buffer (laid out as the file: block stride, padding included) as memory."""
    staging_layout = dataclasses.replace(layout, num_blocks=staging.size // layout.block_stride)
    return TensorStorage(staging_layout, [torch.from_numpy(staging)], MemoryKind.DRAM)


def _copy_from_disk(
    source: DiskStorage, src_arr: np.ndarray, target: TensorStorage, dst_arr: np.ndarray
) -> None:
    """Read the blocks into a staging buffer, then scatter its rows into ``target``."""
    staging = source.staging_buffer(src_arr.size)
    source.read_into(src_arr, staging)
    staged = _staging_storage(source.layout, staging)
    plan = build_plan(staged.layout, staged.tensors, target.layout, target.tensors)
    _copy_rows(plan, np.arange(src_arr.size), dst_arr, same_storage=False)


def _copy_to_disk(
    source: TensorStorage | DiskStorage,
    src_arr: np.ndarray,
    target: DiskStorage,
    dst_arr: np.ndarray,
) -> None:
    """Gather the blocks into a staging buffer (read from disk first if ``source`` is a file),
    then write its rows to ``target``."""
    staging = target.staging_buffer(dst_arr.size)
    staged = _staging_storage(target.layout, staging)
    if isinstance(source, DiskStorage):
        read = source.staging_buffer(src_arr.size)
        source.read_into(src_arr, read)
        memory = _staging_storage(source.layout, read)
        src_arr = np.arange(src_arr.size)
    else:
        memory = source
    plan = build_plan(memory.layout, memory.tensors, staged.layout, staged.tensors)
    _copy_rows(plan, src_arr, np.arange(dst_arr.size), same_storage=False)
    target.write_from(dst_arr, staging)


def _copy_rows(
    plan: PairPlan, src_ids: np.ndarray, dst_ids: np.ndarray, *, same_storage: bool
) -> None:
    overlapping = same_storage and bool(np.intersect1d(src_ids, dst_ids).size)
    small = src_ids.size <= SMALL_BATCH and not overlapping and plan.on_cpu
    if small and kernels.native_available():
        _batched_copy_small(plan, src_ids.tolist(), dst_ids.tolist())
        return
    starts = _run_starts(src_ids, dst_ids)
    bytes_per_pair = src_ids.size * plan.src_layout.block_bytes // plan.num_pairs
    short_runs = bytes_per_pair < NATIVE_MAX_RUN_BYTES * starts.size
    if (
        plan.on_cpu
        and not overlapping
        and (short_runs or torch.get_num_threads() == 1)
        and kernels.native_available()
    ):
        _batched_copy_rows(plan, src_ids, dst_ids, starts)
        return
    src_views, dst_views = plan.word_views()
    if bytes_per_pair >= SLICE_MIN_RUN_BYTES * starts.size and not overlapping:
        ends = np.append(starts[1:], src_ids.size)
        runs = [
            (int(src_ids[s]), int(dst_ids[s]), int(e - s))
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        for sv, dv in zip(src_views, dst_views, strict=True):
            for s, d, n in runs:
                dv[d : d + n].copy_(sv[s : s + n])
        return
    for sv, dv in zip(src_views, dst_views, strict=True):
        if sv.device.type == dv.device.type == "cpu":
            dv.numpy()[dst_ids] = sv.numpy()[src_ids]
        else:
            rows = sv.index_select(0, torch.from_numpy(src_ids).to(sv.device))
            dv.index_copy_(0, torch.from_numpy(dst_ids).to(dv.device), rows.to(dv.device))


def _run_starts(src_ids: np.ndarray, dst_ids: np.ndarray) -> np.ndarray:
    """Positions where a run of pairs ascending together by one (in both id lists) starts."""
    return np.flatnonzero(
        (np.diff(src_ids, prepend=src_ids[0] - 2) != 1)
        | (np.diff(dst_ids, prepend=dst_ids[0] - 2) != 1)
    )


def _batched_copy_small(plan: PairPlan, src_ids: list[int], dst_ids: list[int]) -> None:
    """``_batched_copy_rows`` for a few blocks: runs found with Python ints, descriptors built
    from lists (``np.array`` of a short list is the cheapest way to an int64 tensor)."""
    chunks: list[list[int]] = []  # [source block, destination block, number of blocks]
    for s, d in zip(src_ids, dst_ids, strict=True):
        last = chunks[-1] if chunks else None
        if plan.whole_runs and last and s == last[0] + last[2] and d == last[1] + last[2]:
            last[2] += 1
        else:
            chunks.append([s, d, 1])
    lengths = _int64_tensor([n * plan.row_bytes for _, _, n in chunks])
    for (src_bytes, src_base), (dst_bytes, dst_base) in zip(
        plan.src_rows, plan.dst_rows, strict=True
    ):
        kernels.batched_copy(
            src_bytes,
            dst_bytes,
            _int64_tensor([s * plan.src_stride + src_base for s, _, _ in chunks]),
            _int64_tensor([d * plan.dst_stride + dst_base for _, d, _ in chunks]),
            lengths,
        )


def _int64_tensor(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _batched_copy_rows(
    plan: PairPlan, src_ids: np.ndarray, dst_ids: np.ndarray, starts: np.ndarray
) -> None:
    """One native batched copy per buffer pair.

    Each pair copies one row per block, or one chunk per run when both sides hold their rows
    back to back (no padding, no per-layer split).
    """
    src_stride, dst_stride = plan.src_stride, plan.dst_stride
    if plan.whole_runs:
        run_lengths = np.diff(starts, append=src_ids.size)
        src_offsets = src_ids[starts] * src_stride
        dst_offsets = dst_ids[starts] * dst_stride
        lengths = torch.from_numpy(run_lengths * plan.row_bytes)
    else:
        src_offsets, dst_offsets = src_ids * src_stride, dst_ids * dst_stride
        lengths = torch.full((src_ids.size,), plan.row_bytes, dtype=torch.int64)
    for (src_bytes, src_base), (dst_bytes, dst_base) in zip(
        plan.src_rows, plan.dst_rows, strict=True
    ):
        kernels.batched_copy(
            src_bytes,
            dst_bytes,
            torch.from_numpy(src_offsets + src_base),
            torch.from_numpy(dst_offsets + dst_base),
            lengths,
        )
