"""The ``tiers-vs-peers`` flags and run: every (block size, system) row, one after another."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fabric.bench.deployment import machine
from fabric.bench.tiers_vs_peers.measure import (
    BLOCK_TOKENS,
    WARM_UP_BATCHES,
    ClosablePath,
    Plan,
    VerificationFailed,
    kv_shape,
    measure_and_close,
    memcpy_gbps,
)
from fabric.bench.tiers_vs_peers.peers import PEERS, error_row, peer_row
from fabric.bench.tiers_vs_peers.report import best_of_rounds, size_label, summarize
from fabric.errors import ConfigError
from fabric.kvbm.tiers import kernels
from fabric.supervise import sigterm_raises

OURS = ("fabric_host", "fabric_node", "fabric_disk")
SYSTEMS = (*OURS, *PEERS)
TIERS = {"fabric_host": "host", "fabric_node": "host", "fabric_disk": "disk"}
PATHS = {
    "fabric_host": "kvbm G2: offload(device blocks, HOST) = allocate + one copy_blocks + "
    "register; load = match_and_onboard (match, allocate device blocks, one copy, register)",
    "fabric_node": "node cache process + NodeCacheClient over real shared memory: store = "
    "reserve round trip + one copy into the segment + commit round trip; load = a full hit "
    "through the segment's slot index (probe, one copy out, generation re-check, no round "
    "trip), else a lookup round trip (pin) + one copy out + one-way unpin",
    "fabric_disk": "kvbm G3 (one O_DIRECT file): offload(device blocks, DISK) = allocate + "
    "write + register; load = match_and_onboard from DISK (read + register)",
    "kvcr_host": "kvcr local DRAM: deposit (NIXL UCX copy into kvcr's pool) / deliver, "
    "waited for with poll_completed",
    "kvcr_disk": "kvcr G3 (POSIX backend, O_DIRECT file) behind a full 64-block DRAM pool: "
    "deposit in 64-block steps, each spilling as many older blocks to the file (kvcr's only "
    "way into G3); load = deliver straight from the file",
    "lmcache_cpu": "LMCache engine, local_cpu backend, 16-token chunks: store = hash the "
    "token ids + allocate + one copy per chunk + put; retrieve = hash + lookup + one copy per "
    "chunk",
}
"""What each system's store and load include (also printed in the JSON)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        default="256,16",
        metavar="KIB[,KIB...]",
        help="block sizes in KiB, each a multiple of 0.5 KiB (default: %(default)s)",
    )
    parser.add_argument(
        "--total-mib",
        type=float,
        default=64.0,
        metavar="MIB",
        help="bytes stored and loaded per timed batch (default: %(default)s)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        metavar="NAME[,NAME...]",
        help=f"which rows to measure, of {', '.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed batches per row after two warm-up batches; figures are their medians "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="times every row is measured, the systems taking turns so that background load "
        "hits them alike; a row keeps each figure's best round (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-samples",
        type=int,
        default=200,
        metavar="N",
        help="single-block stores and loads timed one by one for p50/p99 (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        metavar="DIR",
        help="where the disk tiers' files and the node cache's log go (a private "
        "directory under it, removed at the end; default: %(default)s)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="bound on each peer row's subprocess (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (block size, system) row and summarise them (package docstring)."""
    systems = _systems(args.systems)
    sizes = _sizes(args.sizes)
    total = int(args.total_mib * 2**20)
    if args.rounds < 1 or args.repeats < 1 or args.latency_samples < 1:
        raise ConfigError("--rounds, --repeats and --latency-samples must be at least 1")
    plans = [_plan(block_bytes, total, args) for block_bytes in sizes]
    if any(s in OURS for s in systems) and not kernels.build():  # waits for a build under way
        _log("the native copy kernels are not available: our copies use the pure fallback")
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one copy thread everywhere (the LMCache runner does the same)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        with (
            sigterm_raises(),  # a SIGTERM still stops the node cache and a peer's runner
            tempfile.TemporaryDirectory(prefix="tiers-vs-peers-", dir=args.workdir) as tmp,
        ):
            for round_index in range(args.rounds):
                for plan in plans:
                    for system in systems:
                        _log(
                            f"round {round_index + 1}/{args.rounds}: {system}, "
                            f"{size_label(plan.block_bytes)} blocks x {plan.num_blocks}"
                        )
                        row = _row(system, plan, Path(tmp), args.peer_timeout)
                        runs.setdefault((system, plan.block_bytes), []).append(row)
                        _log(_describe(row))
            memcpy = memcpy_gbps(total, args.repeats)
    finally:
        torch.set_num_threads(threads)
    rows = [best_of_rounds(runs[(s, p.block_bytes)]) for p in plans for s in systems]
    summary, goals = summarize(rows)
    return {
        "rows": rows,
        "memcpy": {"gbps": memcpy, "bytes": total, "what": "np.copyto, one process, best"},
        "summary": summary,
        "goals": goals,
        "paths": {s: PATHS[s] for s in systems},
        "params": {
            "sizes_kib": [b / 1024 for b in sizes],
            "total_mib": args.total_mib,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "warm_up_batches": WARM_UP_BATCHES,
            "latency_samples": args.latency_samples,
            "block_tokens": BLOCK_TOKENS,
            "tier_capacity": "a batch and an eighth (every store evicts)",
            "copy_threads": 1,
            "native_copy_kernels": kernels.native_available(),
        },
        "machine": machine(load_before),
    }


def _plan(block_bytes: int, total: int, args: argparse.Namespace) -> Plan:
    if total % block_bytes or total < block_bytes:
        raise ConfigError(f"--total-mib is no whole number of {block_bytes} B blocks")
    return Plan(block_bytes, total // block_bytes, args.repeats, args.latency_samples)


def _row(system: str, plan: Plan, tmp: Path, peer_timeout_s: float) -> dict[str, Any]:
    """One measurement of ``system``, in a fresh directory under ``tmp``."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=tmp))
    if system in PEERS:
        return peer_row(PEERS[system], plan, workdir, peer_timeout_s)
    return _our_row(system, plan, workdir)


def _our_row(system: str, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Measure one of our systems in this process (the node cache in its own)."""
    from fabric.bench.tiers_vs_peers.ours import KvbmTierPath, NodeTierPath
    from fabric.kvbm import Tier

    tier = TIERS[system]
    build: Callable[[], ClosablePath]
    if system == "fabric_node":
        build = lambda: NodeTierPath(plan, workdir, progress=_log)  # noqa: E731
    else:
        kvbm_tier = Tier.HOST if tier == "host" else Tier.DISK
        build = lambda: KvbmTierPath(plan, kvbm_tier, workdir)  # noqa: E731
    try:
        figures = measure_and_close(build(), plan, log=lambda m: _log(f"{system}: {m}"))
    except VerificationFailed as exc:
        row = error_row(system, tier, plan, f"verification failed: {exc}")
        row["verified"] = False
        return row
    except Exception as exc:  # reported in its row: the other rows still run
        return error_row(system, tier, plan, f"{type(exc).__name__}: {exc}")
    return {"system": system, "tier": tier, **figures}


def _systems(value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        raise ConfigError(f"--systems: unknown {unknown or 'none given'}; choose from {SYSTEMS}")
    return names


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(float(s) * 1024) for s in value.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes takes KiB numbers separated by commas, not {value!r}") from None
    for size in sizes:
        try:
            kv_shape(size)
        except ValueError as exc:
            raise ConfigError(f"--sizes: {exc}") from None
    if not sizes:
        raise ConfigError("--sizes: give at least one block size")
    return sizes


def _describe(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['system']}: error: {row['error']}"
    return (
        f"{row['system']}: store {row['store_gbps']} GB/s, load {row['load_gbps']} GB/s, "
        f"load latency p50 {row['latency_us_p50']} us, verified {row['verified']}"
    )


def _log(message: str) -> None:
    print(f"tiers-vs-peers: {message}", file=sys.stderr, flush=True)
