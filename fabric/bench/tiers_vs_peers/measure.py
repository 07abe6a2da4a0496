"""The measurement every system of ``tiers-vs-peers`` goes through: one driver, one checker.

Imports only the standard library and numpy: the peers' runners (``kvcr_runner.py``,
``lmcache_runner.py``) run in the peers' own virtual environments, which have no ``fabric``, and
import this file as the top-level module ``measure`` (a script's directory is on its path), so
ours and theirs are timed and checked by the same code.

A system is a ``TierPath``: the engine's KV buffers it stores from and loads into, and its
public store / load calls. ``measure_path`` drives it:

    per batch (``WARM_UP_BATCHES``, then ``repeats`` timed ones), fresh keys and random bytes:
      stage (untimed: the bytes into the engine's buffers, the calls' arguments built)
      store (timed)                      -> store_gbps: bytes / time, median over repeats
      clear (untimed: engine buffers zeroed, the engine's own copy of the keys dropped)
      load  (timed)                      -> load_gbps
      loaded == staged, byte for byte    -> else VerificationFailed
      finish (untimed: references released)
    then ``latency_samples`` single blocks the same way, each timed alone: p50 / p99 in us.

Invariants: a row says ``verified: true`` only when every load of the run (every batch and
every single block) equalled what was staged for those keys; keys are never reused, so a stale
block from an earlier batch cannot pass for a new one. A system holds ``capacity_blocks(plan)``
blocks, a batch and an eighth: from the second warm-up batch on, every store evicts about as
many blocks of earlier batches as it stores, into memory the warm-up already touched. That is
the steady state of a full cache, and every figure includes it (no system is timed on fresh
pages, which cost a page fault per 4 KiB on first touch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

BLOCK_TOKENS = 16
"""Tokens per block for the systems that take tokens or a model geometry (ours, LMCache)."""
NUM_LAYERS = 8
WARM_UP_BATCHES = 2
DTYPE_BYTES = 2  # float16
MAX_HEAD_SIZE = 128


class VerificationFailed(Exception):
    """A load returned bytes other than those stored under its keys."""


class TierPath(Protocol):
    """One system's store and load path between the engine's KV buffers and one of its tiers.

    Keys are ints unique over a run; position ``i`` of a call's keys is row ``i`` of its data.
    ``store`` and ``load`` raise when they did not store / load every block.
    """

    def stage(self, keys: Sequence[int], data: np.ndarray) -> None:
        """Put ``data`` (``len(keys)`` x block bytes, uint8) in the engine's buffers."""
        ...

    def store(self, keys: Sequence[int]) -> None: ...

    def clear(self, keys: Sequence[int]) -> None:
        """Zero the engine's buffers of ``keys`` and drop any engine-side copy of them."""
        ...

    def load(self, keys: Sequence[int]) -> None: ...

    def loaded(self, keys: Sequence[int]) -> np.ndarray:
        """The engine's buffers of ``keys`` after ``load`` (``len(keys)`` x block bytes)."""
        ...

    def finish(self, keys: Sequence[int]) -> None:
        """Release what ``load`` left referenced."""
        ...


class ClosablePath(TierPath, Protocol):
    """A ``TierPath`` that owns its system (closed after it was measured)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What one row measures: ``num_blocks`` blocks of ``block_bytes`` per batch."""

    block_bytes: int
    num_blocks: int
    repeats: int
    latency_samples: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_bytes <= 0 or self.block_bytes % (BLOCK_TOKENS * NUM_LAYERS * 4):
            raise ValueError(f"block bytes must be a positive multiple of 512, not {self}")
        if self.num_blocks < 1 or self.repeats < 1 or self.latency_samples < 1:
            raise ValueError(f"blocks, repeats and latency samples must be positive: {self}")


def capacity_blocks(plan: Plan) -> int:
    """Blocks each system's tier holds: one batch and an eighth (module docstring)."""
    return plan.num_blocks + max(1, plan.num_blocks // 8)


def kv_shape(block_bytes: int) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of fp16 blocks of ``BLOCK_TOKENS`` tokens, K and V split,
    that are ``block_bytes`` long: 256 KiB is 8 layers x 4 heads x 128, 16 KiB 8 x 1 x 32."""
    per_head = block_bytes // (BLOCK_TOKENS * NUM_LAYERS * 2 * DTYPE_BYTES)
    head_size = min(MAX_HEAD_SIZE, per_head)
    if (
        per_head * BLOCK_TOKENS * NUM_LAYERS * 2 * DTYPE_BYTES != block_bytes
        or per_head % head_size
    ):
        raise ValueError(f"{block_bytes} B is no whole number of fp16 heads per block")
    return NUM_LAYERS, per_head // head_size, head_size


def first_mismatch(expected: np.ndarray, actual: np.ndarray) -> int | None:
    """The first row (block) where ``actual`` differs from ``expected``; None when equal.
    A shape difference is a mismatch at row 0."""
    if expected.shape != actual.shape:
        return 0
    if np.array_equal(expected, actual):
        return None
    rows = np.flatnonzero((expected != actual).reshape(len(expected), -1).any(axis=1))
    return int(rows[0])


def check_loaded(path: TierPath, keys: Sequence[int], data: np.ndarray) -> None:
    """Raise ``VerificationFailed`` unless ``path`` loaded exactly ``data`` for ``keys``."""
    row = first_mismatch(data, path.loaded(keys))
    if row is not None:
        raise VerificationFailed(
            f"block {row} of {len(keys)} (key {keys[row]}) came back with other bytes"
        )


def measure_path(
    path: TierPath, plan: Plan, *, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Measure ``path`` under ``plan`` (module docstring); the figures of one row."""
    rng = np.random.default_rng(plan.seed)
    next_key = 1
    total = plan.num_blocks * plan.block_bytes
    store_s: list[float] = []
    load_s: list[float] = []
    for batch in range(WARM_UP_BATCHES + plan.repeats):
        warm_up = batch < WARM_UP_BATCHES  # faults pages in, starts threads, fills the tier
        keys = list(range(next_key, next_key + plan.num_blocks))
        next_key += plan.num_blocks
        data = _random_blocks(rng, plan.num_blocks, plan.block_bytes)
        took_store, took_load = _round_trip(path, keys, data)
        if not warm_up:
            store_s.append(took_store)
            load_s.append(took_load)
        log(
            f"batch {batch}{' (warm-up)' if warm_up else ''}: store "
            f"{total / took_store / 1e9:.2f} GB/s, load {total / took_load / 1e9:.2f} GB/s"
        )
    single_store: list[float] = []
    single_load: list[float] = []
    for _ in range(plan.latency_samples):
        keys = [next_key]
        next_key += 1
        took_store, took_load = _round_trip(path, keys, _random_blocks(rng, 1, plan.block_bytes))
        single_store.append(took_store)
        single_load.append(took_load)
    return {
        "block_bytes": plan.block_bytes,
        "num_blocks": plan.num_blocks,
        "store_gbps": _gbps(total, statistics.median(store_s)),
        "load_gbps": _gbps(total, statistics.median(load_s)),
        "store_gbps_all": [_gbps(total, s) for s in store_s],
        "load_gbps_all": [_gbps(total, s) for s in load_s],
        "latency_us_p50": _percentile_us(single_load, 50),
        "latency_us_p99": _percentile_us(single_load, 99),
        "store_latency_us_p50": _percentile_us(single_store, 50),
        "store_latency_us_p99": _percentile_us(single_store, 99),
        "verified": True,  # every load above passed check_loaded, or we raised
    }


def measure_and_close(
    path: ClosablePath, plan: Plan, *, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """``measure_path``, then ``path.close()`` whatever happened."""
    try:
        return measure_path(path, plan, log=log)
    finally:
        path.close()


def memcpy_gbps(total_bytes: int, repeats: int) -> float:
    """One-process ``np.copyto`` of ``total_bytes`` (both buffers faulted in): the best of
    ``repeats``, in GB/s; the physical limit every path here is bounded by."""
    src = np.ones(total_bytes, dtype=np.uint8)
    dst = np.zeros(total_bytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats + 1):
        began = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - began)
    return _gbps(total_bytes, best)


def _round_trip(path: TierPath, keys: list[int], data: np.ndarray) -> tuple[float, float]:
    path.stage(keys, data)
    began = time.perf_counter()
    path.store(keys)
    took_store = time.perf_counter() - began
    path.clear(keys)
    began = time.perf_counter()
    path.load(keys)
    took_load = time.perf_counter() - began
    check_loaded(path, keys, data)
    path.finish(keys)
    return took_store, took_load


def _random_blocks(rng: np.random.Generator, num_blocks: int, block_bytes: int) -> np.ndarray:
    raw = np.frombuffer(bytearray(rng.bytes(num_blocks * block_bytes)), dtype=np.uint8)
    return raw.reshape(num_blocks, block_bytes)


def _gbps(num_bytes: int, seconds: float) -> float:
    return round(num_bytes / seconds / 1e9, 3)


def _percentile_us(samples: Sequence[float], pct: int) -> float:
    return round(float(np.percentile(np.asarray(samples), pct)) * 1e6, 1)


# -- the runners' side: flags in, one JSON line out ---------------------------------------------


def runner_parser(description: str) -> argparse.ArgumentParser:
    """The flags every peer runner takes (``plan_of`` reads them back)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tier", choices=("host", "disk"), required=True)
    parser.add_argument("--block-bytes", type=int, required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--latency-samples", type=int, required=True)
    parser.add_argument("--workdir", required=True, help="a private directory for disk files")
    return parser


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(args.block_bytes, args.num_blocks, args.repeats, args.latency_samples)


def plan_flags(plan: Plan) -> list[str]:
    """``runner_parser``'s flags for ``plan`` (the orchestrator's side)."""
    fields = dataclasses.asdict(plan)
    del fields["seed"]
    return [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]


def emit(result: dict[str, Any]) -> None:
    """Print a runner's result as the last line of its stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def stderr_log(prefix: str) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)

    return log
