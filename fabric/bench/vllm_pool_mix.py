"""vLLM v1's own prefix hashing and block pool under the mix ``fabric.bench.kvbm`` runs on ours.

Run with the vLLM virtual environment's python (``launch/setup_vllm.sh`` makes it); it imports only
the standard library, numpy and vllm, never ``fabric``. It prints one JSON object on stdout (vLLM's
warnings, if any, go to stderr).

Three measurements, each through vLLM's own code (``vllm/v1/core``), nothing re-implemented:

* hashing: a ``Request`` built with ``get_request_block_hasher(block_size, hash_fn)`` hashes the
  prompt's full blocks in its constructor (chained ``hash_block_tokens``), as the engine does on
  arrival. Every ``prefix_caching_hash_algo`` vLLM offers is measured; the default one is read
  from ``CacheConfig``. Mega-tokens per second, best of ``repeats``.
* pool mix, per round: ``get_new_blocks(batch)``; ``cache_full_blocks`` (registers them under
  ``batch`` hashes never seen before); match that chain the way ``FullAttentionManager`` does
  (``get_cached_block`` per hash until the first miss) and ``touch`` the hits (the reference a
  scheduled request takes); ``free_blocks`` the hits; ``free_blocks`` the allocation. Once the
  pool has handed out every block, each allocation evicts cached blocks. Thousand blocks per
  second, best of ``repeats``, a fresh pool each time, hashes made before the clock starts.
* match latency: one chain of ``match_blocks`` blocks is registered and freed (a finished
  request's prefix, cached at reference count 0); then match + touch + free of the whole chain is
  timed ``match_iters`` times. Median, in microseconds per 1000 blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

KV_CACHE_GROUP_ID = 0
"""The single full-attention KV cache group every block belongs to here."""


class _HashCarrier:
    """The one attribute of a ``Request`` that ``BlockPool.cache_full_blocks`` reads."""

    __slots__ = ("block_hashes",)

    def __init__(self, block_hashes: list[bytes]) -> None:
        self.block_hashes = block_hashes


def _match_and_touch(pool: Any, block_hashes: Sequence[bytes]) -> list[Any]:
    """``FullAttentionManager.find_longest_cache_hit`` (one group) followed by ``touch``."""
    group_ids = [KV_CACHE_GROUP_ID]
    hit: list[Any] = []
    for block_hash in block_hashes:
        cached = pool.get_cached_block(block_hash, group_ids)
        if not cached:
            break
        hit.append(cached[0])
    pool.touch(hit)
    return hit


def _distinct_hashes(count: int, start: int = 0) -> list[bytes]:
    """``count`` distinct 32-byte block hashes, shaped like the default (sha256) ones."""
    return [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(start, start + count)]


def bench_hashing(tokens: list[int], block_size: int, repeats: int) -> dict[str, Any]:
    """Chained block hashing of ``tokens`` with every hash algorithm vLLM offers."""
    from vllm.config.cache import CacheConfig, PrefixCachingHashAlgo
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    sampling_params = SamplingParams(max_tokens=1)
    num_blocks = len(tokens) // block_size
    mtokens_per_s: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for algo in typing.get_args(PrefixCachingHashAlgo):
        hash_fn: Callable[[Any], bytes] = get_hash_fn_by_name(algo)
        try:
            init_none_hash(hash_fn)
        except ModuleNotFoundError as exc:  # xxhash is optional for vLLM
            unavailable[algo] = str(exc)
            continue
        hasher = get_request_block_hasher(block_size, hash_fn)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            request = Request("bench", tokens, sampling_params, None, block_hasher=hasher)
            best = min(best, time.perf_counter() - start)
        if len(request.block_hashes) != num_blocks:
            raise RuntimeError(f"{algo}: {len(request.block_hashes)} hashes, want {num_blocks}")
        mtokens_per_s[algo] = round(num_blocks * block_size / best / 1e6, 3)
    return {
        "hash_mtokens_per_s": mtokens_per_s,
        "hash_default_algo": CacheConfig().prefix_caching_hash_algo,
        "hash_fastest_algo": max(mtokens_per_s, key=mtokens_per_s.__getitem__),
        "hash_unavailable": unavailable,
    }


def _run_pool_mix(
    hashes_by_round: list[list[bytes]], batch: int, block_size: int, num_blocks: int
) -> float:
    """One pass of the mix on a fresh pool; returns the elapsed seconds."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=block_size)
    carrier = _HashCarrier([])
    num_matched = 0
    start = time.perf_counter()
    for block_hashes in hashes_by_round:
        blocks = pool.get_new_blocks(batch)
        carrier.block_hashes = block_hashes
        pool.cache_full_blocks(carrier, blocks, 0, batch, block_size, KV_CACHE_GROUP_ID)
        hit = _match_and_touch(pool, block_hashes)
        num_matched += len(hit)
        pool.free_blocks(hit)
        pool.free_blocks(blocks)
    elapsed = time.perf_counter() - start
    if num_matched != batch * len(hashes_by_round):
        raise RuntimeError(f"pool mix matched {num_matched} of {batch * len(hashes_by_round)}")
    return elapsed


def bench_pool_mix(
    batch: int, rounds: int, block_size: int, num_blocks: int, repeats: int
) -> dict[str, Any]:
    """Allocate/register/match/free rounds; thousand blocks per second, best of ``repeats``."""
    flat = _distinct_hashes(batch * rounds)
    hashes_by_round = [flat[r * batch : (r + 1) * batch] for r in range(rounds)]
    best = min(
        _run_pool_mix(hashes_by_round, batch, block_size, num_blocks) for _ in range(repeats)
    )
    return {"alloc_register_kblocks_per_s": round(batch * rounds / best / 1e3, 1)}


def bench_match(match_blocks: int, block_size: int, num_blocks: int, iters: int) -> dict[str, Any]:
    """Median match + touch + free of a cached ``match_blocks`` chain, per 1000 blocks."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=block_size)
    chain = _distinct_hashes(match_blocks, start=1 << 40)
    blocks = pool.get_new_blocks(match_blocks)
    pool.cache_full_blocks(_HashCarrier(chain), blocks, 0, match_blocks, block_size, 0)
    pool.free_blocks(blocks)
    samples: list[float] = []
    for _ in range(iters):
        start = time.perf_counter()
        hit = _match_and_touch(pool, chain)
        pool.free_blocks(hit)
        samples.append(time.perf_counter() - start)
        if len(hit) != match_blocks:
            raise RuntimeError(f"match found {len(hit)} of {match_blocks} cached blocks")
    per_chain_us = statistics.median(samples) * 1e6
    return {"match_us_per_1k_blocks": round(per_chain_us * 1000 / match_blocks, 1)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; defaults give a run of a few seconds after vLLM's import."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=131072, help="prompt length to hash")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--num-blocks", type=int, default=16384, help="blocks in the pool")
    parser.add_argument("--batch", type=int, default=64, help="blocks allocated per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=512,
        help="rounds per pass (past num_blocks/batch rounds, allocation evicts cached blocks)",
    )
    parser.add_argument("--match-blocks", type=int, default=1024, help="chain length to match")
    parser.add_argument("--match-iters", type=int, default=100, help="timed matches of the chain")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the best one counts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the three measurements and print their JSON on stdout."""
    args = parse_args(argv)
    import vllm

    # init_none_hash warns that the xxhash algorithms seed NONE_HASH per process: expected here.
    logging.getLogger("vllm").setLevel(logging.ERROR)

    tokens = np.random.default_rng(0).integers(0, 32000, args.num_tokens).tolist()
    result: dict[str, Any] = {"vllm_version": vllm.__version__}
    result |= bench_hashing(tokens, args.block_size, args.repeats)
    result |= bench_pool_mix(
        args.batch, args.rounds, args.block_size, args.num_blocks, args.repeats
    )
    result |= bench_match(args.match_blocks, args.block_size, args.num_blocks, args.match_iters)
    result["params"] = {
        k: getattr(args, k)
        for k in (
            "num_tokens",
            "block_size",
            "num_blocks",
            "batch",
            "rounds",
            "match_blocks",
            "match_iters",
            "repeats",
        )
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
