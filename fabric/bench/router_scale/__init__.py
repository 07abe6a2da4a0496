"""Router at fleet scale, simulated: KV event ingest, index memory and routing latency.

For each fleet size of ``--workers``, two fresh processes on this machine: the simulated workers
(``sim_workers``: one ZeroMQ PUB per worker on 127.0.0.1, each streaming a realistic cache's
events in vLLM's wire format: prompts stored on the device, decode blocks one by one, write-through
host copies, device and host evictions, shared system prompts on every worker) and the measured
frontend side (``measure``: the real ``KvPrefixIndex`` of a ``Fleet``, one real
``KvEventSubscriber`` per worker over real sockets and the real codec, the real
``Router.choose``). The cache grows in stages (``--cached-blocks``: (worker, block) pairs in the
index at the stage's end, every stage with churn) and after each stage the router is timed on
prompts of ``--prompt-tokens`` tokens (block size 16, the fabric's default), each held longest by
one worker (device and host), shorter by another (host) and whole by a third on disk only.

Output: ``rows``, one per (fleet size, stage, prompt length), with ``workers``, ``cached_blocks``
(pairs in the index), ``prompt_tokens``, ``ingest_blocks_per_s`` (blocks named by the stage's
stored and removed events, per second, until every subscriber applied them), ``bytes_per_block``
(the measured process's resident growth since its subscribers were synced, over
``cached_blocks``), ``route_ms_p50``, ``route_ms_p99`` (one decision, prompt hashing included,
ingest idle); ``hash_ms_p50`` (hashing a whole prompt as the router does,
``sequence_hash_chunks``, per fleet size and prompt length; native when ``hash_native``, the
measured process having loaded the ``csrc/`` extension as a frontend does), ``hash_ms_p50_python``
(the same with ``FABRIC_NATIVE_KERNELS=0``: the Python path),
``checks`` (routes, and how many picked the longest prefix's holder as KV provider), ``goals``
and the parameters. ``--quick``: a small run for tests (seconds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
from typing import Any

from fabric.bench.router_scale.sim_workers import FleetParams
from fabric.errors import FabricError

FULL = {"workers": [64, 512], "cached_blocks": [1_000_000, 10_000_000]}
QUICK = {"workers": [4, 16], "cached_blocks": [4_000, 16_000]}
FULL_PROMPT_TOKENS = [2048, 8192, 32768]
QUICK_PROMPT_TOKENS = [2048]
GOALS = {
    "ingest_blocks_per_s": 1_000_000,
    "route_ms_p99_at_512": 1.0,
    "bytes_per_block": 100,
}
CHILD_TIMEOUT_S = 3600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds), for tests")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="fleet sizes (default 64 512; quick: 4 16)"
    )
    parser.add_argument(
        "--cached-blocks",
        type=int,
        nargs="+",
        help="stages: (worker, block) pairs indexed at each stage's end "
        "(default 1000000 10000000; quick: 4000 16000)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs="+",
        help="prompt lengths the router is timed on (default 2048 8192 32768; quick: 2048)",
    )
    parser.add_argument("--prompts", type=int, help="prompts per length and stage (50; quick: 6)")
    parser.add_argument("--repeats", type=int, default=4, help="decisions per prompt (4)")
    parser.add_argument(
        "--churn",
        type=float,
        default=0.25,
        help="per stage, blocks stored beyond a full cache, as a share of it (0.25)",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = QUICK if args.quick else FULL
    fleet_sizes: list[int] = args.workers or shape["workers"]
    stages: list[int] = args.cached_blocks or shape["cached_blocks"]
    prompt_tokens = args.prompt_tokens or (
        QUICK_PROMPT_TOKENS if args.quick else FULL_PROMPT_TOKENS
    )
    num_prompts = args.prompts or (6 if args.quick else 50)
    if min(fleet_sizes) < 3:
        raise FabricError("--workers: at least 3 (a prompt has three holders)")
    loadavg_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    hashing: dict[str, dict[int, float]] = {}
    hashing_python: dict[str, dict[int, float]] = {}
    hash_native: list[bool] = []
    checks = {"routes": 0, "longest_prefix_picked": 0}
    for num_workers in fleet_sizes:
        params = FleetParams(num_workers, stages, prompt_tokens, num_prompts, args.churn, args.seed)
        result = _run_fleet(params, args.repeats)
        rows += result["rows"]
        hashing[str(num_workers)] = result["hash_ms_p50"]
        hashing_python[str(num_workers)] = result["hash_ms_p50_python"]
        hash_native.append(result["hash_native"])
        for key in checks:
            checks[key] += result["checks"][key]
    return {
        "rows": rows,
        "hash_ms_p50": hashing,
        "hash_ms_p50_python": hashing_python,
        "hash_native": all(hash_native),
        "checks": checks,
        "goals": _goals(rows),
        "params": {
            "quick": args.quick,
            "block_size": 16,
            "prompts": num_prompts,
            "repeats": args.repeats,
            "churn": args.churn,
            "seed": args.seed,
            "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} CPUs",
            "loadavg_before": [round(x, 2) for x in loadavg_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }


def _run_fleet(params: FleetParams, repeats: int) -> dict[str, Any]:
    """One fleet size: the simulated workers' process and the measured process, both fresh."""
    from fabric.bench.router_scale.measure import measure
    from fabric.bench.router_scale.sim_workers import serve

    ctx = multiprocessing.get_context("spawn")
    to_workers, workers_end = ctx.Pipe()
    from_measure, measure_end = ctx.Pipe()
    sim = ctx.Process(
        target=serve, args=(workers_end, params), name="router-scale-workers", daemon=True
    )
    meter = ctx.Process(
        target=measure,
        args=(to_workers, measure_end, repeats),
        name="router-scale-router",
        daemon=True,
    )
    sim.start()
    meter.start()
    try:
        if not from_measure.poll(CHILD_TIMEOUT_S):
            raise FabricError(f"router-scale: no result within {CHILD_TIMEOUT_S:.0f} s")
        kind, payload = from_measure.recv()
        if kind == "error":
            raise FabricError(f"router-scale with {params.num_workers} workers: {payload}")
        result: dict[str, Any] = payload
        return result
    finally:
        for process in (meter, sim):
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(5)


def _goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each goal with the figure that decides it (the worst row) and whether it is met."""
    ingest = min(row["ingest_blocks_per_s"] for row in rows)
    memory = max(row["bytes_per_block"] for row in rows)
    largest = max(row["workers"] for row in rows)
    route_p99 = max(row["route_ms_p99"] for row in rows if row["workers"] == largest)
    ingest_goal = GOALS["ingest_blocks_per_s"]
    memory_goal = GOALS["bytes_per_block"]
    route_goal = GOALS["route_ms_p99_at_512"]
    return {
        "ingest_blocks_per_s": {"worst": ingest, "goal": ingest_goal, "met": ingest >= ingest_goal},
        "bytes_per_block": {"worst": memory, "goal": memory_goal, "met": memory < memory_goal},
        f"route_ms_p99_at_{largest}_workers": {
            "worst": route_p99,
            "goal": route_goal,
            "met": route_p99 < route_goal,
        },
    }
