"""Block copies between tiers in one process: the native kernel against the fallback and memcpy.

For every block size, layout pair and id pattern, ``copy_blocks`` moves ``--total-mib`` of
16-token fp16 blocks of 8 layers x K/V from one host storage to another, twice: with the native
batched-copy kernel (``FABRIC_NATIVE_KERNELS=1``: what ``copy.py`` picks when the extension is
built) and with the pure fallback (``=0``: numpy gathers below ``SLICE_MIN_RUN_BYTES`` per run,
slices above), the two taking turns each round. ``memcpy_gbps`` is one ``np.copyto`` of the same
bytes: the physical limit. Rows:

* ``layouts``: ``fc->fc`` or ``fc->ls`` (fully contiguous source, layer-separate destination);
* ``pattern``: ``scattered`` (every other block) or ``contiguous`` (one run);
* ``native_gbps``, ``fallback_gbps``, ``memcpy_gbps``: total bytes over the best of
  ``--rounds`` runs, in GB/s (1e9 B/s); ``native_vs_fallback``, ``native_vs_memcpy``: ratios.

Each configuration is checked once byte for byte before timing (``verified``). Torch runs with
``--threads`` threads (1 by default: a worker sharing two cores with another should).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fabric.errors import FabricError
from fabric.kvbm import LayoutKind, LayoutSpec, TensorStorage, host_storage
from fabric.kvbm.tiers import kernels
from fabric.kvbm.tiers.block_copy import copy_blocks

NUM_LAYERS, OUTER, TOKENS, ITEMSIZE = 8, 2, 16, 2
_LAYOUT_PAIRS = {
    "fc->fc": (LayoutKind.FULLY_CONTIGUOUS, LayoutKind.FULLY_CONTIGUOUS),
    "fc->ls": (LayoutKind.FULLY_CONTIGUOUS, LayoutKind.LAYER_SEPARATE),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``copy`` subcommand's flags."""
    parser.add_argument("--total-mib", type=int, default=64, help="bytes per copy (MiB)")
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--block-kib", default="16,64,256", help="block sizes, comma separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.total_mib <= 0 or args.rounds <= 0 or args.threads <= 0:
        raise FabricError("--total-mib, --rounds and --threads must be positive")
    block_kib = [int(k) for k in args.block_kib.split(",") if k.strip()]
    if not block_kib or min(block_kib) <= 0:  # KiB sizes hold whole 512 B units
        raise FabricError(f"--block-kib values must be positive, got {args.block_kib!r}")
    torch.set_num_threads(args.threads)
    saved = os.environ.get(kernels.ENV_SWITCH)
    rows = []
    try:
        native = kernels.build()
        for kib in block_kib:
            for name, (src_kind, dst_kind) in _LAYOUT_PAIRS.items():
                for pattern in ("scattered", "contiguous"):
                    rows.append(_row(kib * 1024, name, src_kind, dst_kind, pattern, args, native))
    finally:
        if saved is None:
            os.environ.pop(kernels.ENV_SWITCH, None)
        else:
            os.environ[kernels.ENV_SWITCH] = saved
    return {
        "native_available": native,
        "rows": rows,
        "params": {"total_mib": args.total_mib, "rounds": args.rounds},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def _row(  # noqa: PLR0917 - one benchmark configuration, named by its arguments
    block_bytes: int,
    name: str,
    src_kind: LayoutKind,
    dst_kind: LayoutKind,
    pattern: str,
    args: argparse.Namespace,
    native: bool,
) -> dict[str, Any]:
    num = (args.total_mib << 20) // block_bytes
    span = 2 * num  # scattered ids use every other block of a pool twice as large
    inner = block_bytes // (NUM_LAYERS * OUTER * TOKENS * ITEMSIZE)

    def layout(kind: LayoutKind) -> LayoutSpec:
        return LayoutSpec(kind, span, NUM_LAYERS, OUTER, TOKENS, inner, torch.float16)

    src, dst = host_storage(layout(src_kind), pin=False), host_storage(layout(dst_kind), pin=False)
    try:
        for t in src.tensors:
            t.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, t.shape, dtype=torch.int16))
        ids = list(range(0, span, 2)) if pattern == "scattered" else list(range(num))
        copy_blocks(src, ids, dst, ids)
        _verify(src, dst, ids)
        modes = {"native": "1", "fallback": "0"} if native else {"fallback": "0"}
        best = dict.fromkeys(modes, float("inf"))
        for _ in range(args.rounds):
            for mode, switch in modes.items():
                os.environ[kernels.ENV_SWITCH] = switch
                best[mode] = min(best[mode], _seconds(lambda: copy_blocks(src, ids, dst, ids)))
        total = num * block_bytes
        a, b = np.empty(total, np.uint8), np.ones(total, np.uint8)
        memcpy = min(_seconds(lambda: np.copyto(a, b)) for _ in range(args.rounds))
    finally:
        src.close()
        dst.close()
    gbps = {mode: total / s / 1e9 for mode, s in best.items()}
    native_gbps = gbps.get("native")
    memcpy_gbps = total / memcpy / 1e9
    return {
        "block_bytes": block_bytes,
        "layouts": name,
        "pattern": pattern,
        "total_bytes": total,
        "native_gbps": None if native_gbps is None else round(native_gbps, 3),
        "fallback_gbps": round(gbps["fallback"], 3),
        "memcpy_gbps": round(memcpy_gbps, 3),
        "native_vs_fallback": None
        if native_gbps is None
        else round(native_gbps / gbps["fallback"], 2),
        "native_vs_memcpy": None if native_gbps is None else round(native_gbps / memcpy_gbps, 2),
        "verified": True,
    }


def _verify(src: TensorStorage, dst: TensorStorage, ids: list[int]) -> None:
    for block in (ids[0], ids[len(ids) // 2], ids[-1]):
        for layer in range(NUM_LAYERS):
            for outer in range(OUTER):
                a = src.block_view(block, layer, outer).view(
                    torch.int16
                )  # bits: random fp16 has NaNs
                if not torch.equal(a, dst.block_view(block, layer, outer).view(torch.int16)):
                    raise FabricError(f"copy_blocks corrupted block {block} ({layer}, {outer})")


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
