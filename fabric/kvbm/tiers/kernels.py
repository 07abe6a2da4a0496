"""Native batched byte-chunk copies (``csrc/``), built on first use, with a pure fallback.

``batched_copy(src, dst, src_offsets, dst_offsets, lengths)`` copies ``lengths[i]`` bytes from
``src[src_offsets[i]:]`` to ``dst[dst_offsets[i]:]`` for every chunk ``i`` in one call. It is
how ``copy.py`` moves many small scattered blocks without a Python step per block, and how a
transfer layer can gather scattered blocks into one staging buffer (few NIXL descriptors
instead of one per block).

Two implementations with one contract:

* native: ``batched_copy`` of the ``csrc/`` torch C++ extension (``csrc/block_copy.cpp``, plus
  ``csrc/block_copy_cuda.cu`` when a CUDA device and toolkit exist), which
  ``fabric.kvbm.core.extension`` builds (once per environment, into ``~/.cache``, never the
  checkout) and loads; ``python -m fabric.kvbm.tiers.kernels`` (the set-up) builds it ahead. The
  same extension carries the prompt hashes of ``fabric.kvbm.core.hashing``.
* fallback: numpy (CPU) or per-chunk torch copies (CUDA), used when ``FABRIC_NATIVE_KERNELS=0``,
  when the build fails (logged once at WARNING with the reason), for CUDA tensors when the
  extension was built without CUDA, and while a build is running.

Serving never waits for a compiler: ``native_available`` / ``batched_copy`` load a built library
or start the build in the background and use the fallback until it has loaded (``build`` waits
for it: the set-up, benchmarks and tests call that).

Contract (both paths, checked before any byte moves; a violation raises ``InvalidInput`` with the
same message on both paths for chunk errors): ``src`` and ``dst`` are contiguous uint8 tensors
on one device; the offsets and lengths are 1-D contiguous int64 CPU tensors of one length; every
chunk lies inside its tensor; destination chunks are pairwise disjoint; when ``src`` and ``dst``
share memory no destination chunk overlaps a source chunk. Hence the result does not depend on
the order chunks are copied in, and both paths produce identical bytes.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from fabric.errors import InvalidInput
from fabric.kvbm.core import extension
from fabric.kvbm.core.extension import ENV_BUILD_DIR, ENV_SWITCH, build

__all__ = [
    "ENV_BUILD_DIR",
    "ENV_SWITCH",
    "batched_copy",
    "build",
    "fallback_batched_copy",
    "main",
    "native_available",
]


def native_available() -> bool:
    """Whether ``batched_copy`` runs the compiled extension now (never waits for a build: the
    first call loads a built library or starts the build in the background)."""
    return extension.native() is not None


def batched_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Copy ``lengths[i]`` bytes from ``src[src_offsets[i]:]`` to ``dst[dst_offsets[i]:]``.

    See the module docstring for the contract. Copies on CUDA are queued on the current stream
    (native) and are not synchronised here.

    Raises:
        InvalidInput: a tensor has the wrong dtype, layout or device, or a chunk is out of
            bounds, overlaps another destination chunk or (shared memory) a source chunk.
    """
    native = extension.native()
    if native is not None and (src.device.type == "cpu" or native.with_cuda):
        try:
            native.batched_copy(src, dst, src_offsets, dst_offsets, lengths)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        return
    fallback_batched_copy(src, dst, src_offsets, dst_offsets, lengths)


def fallback_batched_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """``batched_copy`` without the extension: same checks, same messages, same bytes."""
    _check_tensors(src, dst, src_offsets, dst_offsets, lengths)
    so, do, ln = src_offsets.numpy(), dst_offsets.numpy(), lengths.numpy()
    _check_bounds(so, ln, src.numel(), "source")
    _check_bounds(do, ln, dst.numel(), "destination")
    _check_disjoint_destinations(do, ln)
    _check_no_aliasing(src, dst, so, do, ln)
    if src.device.type != "cpu":
        src_flat, dst_flat = src.view(-1), dst.view(-1)
        for s, d, n in zip(so.tolist(), do.tolist(), ln.tolist(), strict=True):
            dst_flat[d : d + n].copy_(src_flat[s : s + n])
        return
    src_bytes, dst_bytes = src.reshape(-1).numpy(), dst.reshape(-1).numpy()
    # Chunks of one length are rows of a sliding-window view of each side (row k starts at byte
    # k); numpy then gathers and scatters them in one fancy-indexing step per distinct length.
    for length in np.unique(ln[ln > 0]).tolist():
        same = ln == length
        src_rows = as_strided(
            src_bytes, (src_bytes.size - length + 1, length), (1, 1), writeable=False
        )
        dst_rows = as_strided(dst_bytes, (dst_bytes.size - length + 1, length), (1, 1))
        dst_rows[do[same]] = src_rows[so[same]]


# ---- checks (mirroring csrc/block_copy.cpp, message for message) ------------------------------


def _check_tensors(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: torch.Tensor,
    dst_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype != torch.uint8:
            raise InvalidInput(
                f"{name} must be a uint8 tensor, got {t.dtype}; view it with .view(torch.uint8)"
            )
        if not t.is_contiguous():
            raise InvalidInput(f"{name} must be contiguous")
    if src.device != dst.device:
        raise InvalidInput(
            f"src is on {src.device} but dst on {dst.device}; both must be on one device"
        )
    n = lengths.numel()
    for name, t in (
        ("src_offsets", src_offsets),
        ("dst_offsets", dst_offsets),
        ("lengths", lengths),
    ):
        if (
            t.dtype != torch.int64
            or t.dim() != 1
            or not t.is_contiguous()
            or t.device.type != "cpu"
        ):
            raise InvalidInput(
                f"{name} must be a 1-D contiguous int64 CPU tensor, got {t.dtype} of shape "
                f"{list(t.shape)} on {t.device}"
            )
        if t.numel() != n:
            raise InvalidInput(
                "src_offsets, dst_offsets and lengths must have one length; got "
                f"{src_offsets.numel()}, {dst_offsets.numel()} and {n}"
            )


def _check_bounds(offsets: np.ndarray, lengths: np.ndarray, size: int, side: str) -> None:
    bad = np.flatnonzero((lengths < 0) | (offsets < 0) | (offsets > size - lengths))
    if bad.size == 0:
        return
    i = int(bad[0])
    if lengths[i] < 0:
        raise InvalidInput(f"chunk {i} has negative length {lengths[i]}")
    raise InvalidInput(
        f"chunk {i} (offset {offsets[i]}, length {lengths[i]}) lies outside the {side}'s "
        f"{size} bytes"
    )


def _sorted_nonempty(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the non-empty chunks ordered by (start, index)."""
    nonempty = np.flatnonzero(lengths > 0)
    return nonempty[np.argsort(starts[nonempty], kind="stable")]


def _check_disjoint_destinations(dst_offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Sorted by start, disjoint chunks each end by the next one's start; report the first pair
    that does not."""
    order = _sorted_nonempty(dst_offsets, lengths)
    starts = dst_offsets[order]
    ends = starts + lengths[order]
    overlapping = np.flatnonzero(ends[:-1] > starts[1:])
    if overlapping.size == 0:
        return
    k = int(overlapping[0])
    raise InvalidInput(
        f"destination chunks {order[k]} ([{starts[k]}, {ends[k]})) and {order[k + 1]} "
        f"([{starts[k + 1]}, {ends[k + 1]})) overlap; each destination byte may be written once "
        "per call"
    )


def _check_no_aliasing(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_offsets: np.ndarray,
    dst_offsets: np.ndarray,
    lengths: np.ndarray,
) -> None:
    src_begin, dst_begin = src.data_ptr(), dst.data_ptr()
    share = (
        src.numel() > 0
        and dst.numel() > 0
        and src_begin < dst_begin + dst.numel()
        and dst_begin < src_begin + src.numel()
    )
    if not share:
        return
    order = _sorted_nonempty(src_offsets, lengths)
    if order.size == 0:
        return
    src_starts = src_offsets[order]
    prefix_max_end = np.maximum.accumulate(src_starts + lengths[order])
    # Destination chunks in source coordinates: the source chunks starting before one ends are
    # the first ``num_before`` sorted ones; it overlaps one of them when they reach past its start.
    starts = dst_offsets + (dst_begin - src_begin)
    num_before = np.searchsorted(src_starts, starts + lengths, side="left")
    reach = prefix_max_end[np.maximum(num_before - 1, 0)]
    overlapping = np.flatnonzero((lengths > 0) & (num_before > 0) & (reach > starts))
    if overlapping.size:
        i = int(overlapping[0])
        raise InvalidInput(
            f"destination chunk {i} ([{dst_offsets[i]}, {dst_offsets[i] + lengths[i]}) of dst) "
            "overlaps a source chunk in the same memory; copy through a separate buffer"
        )


def main() -> int:
    """``python -m fabric.kvbm.tiers.kernels``: build and load the kernels now (set-up)."""
    logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s")
    name, _, _ = extension.target()
    if build():
        print(f"[kernels] native kernels ready in {extension.build_dir(name)}")
        return 0
    print("[kernels] native kernels unavailable; the fallbacks copy and hash", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
