"""The node cache: TTFT of a node-tier hit against a recompute and the other tiers; P/D read rates.

TTFT, one deployment the way ``fabric launch --node-cache`` starts one: a private etcd, this
host's node cache (``fabric serve node-cache``, registered there) and four aggregated workers
(``--threads 1``; A, B and D on core 0, so the hits they serve are timed on one core; C on core
1, since a peer hit keeps its holder busy beside it), each with a device pool of about 1.25
contexts, behind the OpenAI frontend:

    A  node cache, its own host tier, G4     computes every context first
    B  node cache                            node_hit: loads what A stored, one copy per block
    C  nothing below its device              peer_hit: the router has it read a peer over NIXL
    D  G4 only                               g4_hit: reads the files A's write-through wrote

Each round sends, with random token ids (seeded) of ``--prefix-tokens`` per context X, Y and a
turn U of ``--turn-tokens``::

    1 A  X+U   recompute      nothing holds X (A stores it to the node, host tier and G4)
    2 A  Y+U   recompute      evicts X from A's device
    3 A  X+U   own_host_hit   forced local: A onboards X from its own host tier
    4 B  X+U   node_hit       forced local: B loads X from the node cache
    5 C  X+U   peer_hit       the router picks the holder; C reads X over NIXL
    6 D  X+U   g4_hit         forced local, once G4 holds every block of X

Every hit's completion is compared with its round's recompute of X+U (greedy: equal texts mean
equal tokens): ``outputs_equal``. TTFT is timed at the client, HTTP and routing included; the
figures are p50s over ``--rounds``.

P/D read of one prompt's KV (``--prefix-tokens`` tokens of the preset, its block bytes), the
bytes a decode worker needs from a prefill on the same host, in GB/s (1e9 B/s), medians of
``--read-rounds``:

* ``node``: through a node cache process (``python -m fabric.node``): one process stored the
  blocks, another loads them (``NodeCacheClient.load``: a full hit probes the service's slot
  index in shared memory, one copy out of the shared segment, the slots' generations checked:
  no request) with one torch thread, as a worker does; checked byte for byte once;
* ``nixl`` and ``memcpy``: ``python -m fabric.bench transfer`` on the same total bytes in blocks
  of the same size (its ``fabric_gbps``: ``fabric.pd.RemoteReader`` over NIXL between two
  processes, a decode worker's whole read path; its ``memcpy_gbps``: ``np.copyto`` in one
  process).

``memcpy_paired_gbps`` is ``np.copyto`` of the same bytes in the reading process, timed right
after each node load, and ``node_vs_memcpy_paired`` the median of the per-round ratios (a
figure the load of a shared machine moves less than two measurements minutes apart).
``node_pinned_gbps`` is the same load through lookup + pin, one copy, one-way unpin (the path
before the slot index, and still the path of partial hits); ``node_copy_only_gbps`` the copy
out of the segment alone (one pin held around the copies). ``worker_ms_p50`` splits each kind's
TTFT as the serving worker measured it (queue: admission, where the prefix is matched and
loaded; prefill: the tail's compute).

Goals (issue 13): node_hit TTFT within 1.1x of own_host_hit (judged on the ratio of the p50s;
``per_round_ratio_p50``, the median of each round's node/own-host ratio, is beside it, less
sensitive to a machine whose load changes between rounds) and at least 35x faster than a
recompute; the node read at least 0.9x memcpy. Not measured here: a decode worker of a P/D pair
reading its prompt from the node tier (the serving path still reads over NIXL), and reads of a
node cache on another host (not built).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fabric.bench.deployment import (
    G4_DIR,
    STARTUP_S,
    Deployment,
    apply_quick,
    deployed,
    kind_figures,
    machine,
    make_run_dir,
    needs_two_cpus,
    seeded_tokens,
    start_frontend,
    start_worker,
    stat_p50,
)
from fabric.errors import FabricError
from fabric.launch import start_node_cache
from fabric.supervise import Child

BLOCK_SIZE = 16
NODE_GB = 0.5
GOALS = {"node_vs_own_host_max": 1.1, "node_speedup_min": 35.0, "node_read_vs_memcpy_min": 0.9}
WORKER_STATS = ("ttft_ms", "queue_ms", "prefill_ms", "kv_transfer_ms")
QUICK = {"preset": "tiny", "prefix_tokens": 256, "turn_tokens": 21, "rounds": 1, "read_rounds": 3}


class Kind(Enum):
    RECOMPUTE = "recompute"
    OWN_HOST_HIT = "own_host_hit"
    NODE_HIT = "node_hit"
    PEER_HIT = "peer_hit"
    G4_HIT = "g4_hit"


@dataclass(frozen=True, slots=True)
class Step:
    worker: str
    context: str
    kind: Kind
    local: bool
    """Forced local (``prefill_worker: ""``): the worker's own tiers, node cache and G4 only."""


ROUND = (
    Step("A", "X", Kind.RECOMPUTE, local=True),
    Step("A", "Y", Kind.RECOMPUTE, local=True),
    Step("A", "X", Kind.OWN_HOST_HIT, local=True),
    Step("B", "X", Kind.NODE_HIT, local=True),
    Step("C", "X", Kind.PEER_HIT, local=False),
    Step("D", "X", Kind.G4_HIT, local=True),
)
WORKERS = {"A": "0", "B": "0", "C": "1", "D": "0"}  # instance -> CPU


@dataclass(slots=True)
class Measured:
    kind: Kind
    context: str
    ttft_ms: float
    text: str
    fabric: dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``node-cache`` subcommand's flags."""
    parser.add_argument("--preset", default="small", help="model preset (%(default)s)")
    parser.add_argument(
        "--prefix-tokens", type=int, default=2048, help="context length (%(default)s)"
    )
    parser.add_argument(
        "--turn-tokens", type=int, default=37, help="tokens after the context (%(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="TTFT rounds (%(default)s)")
    parser.add_argument("--read-rounds", type=int, default=10, help="timed reads (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, 256-token contexts, 1 round (tests)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure TTFT over a deployment, then the read rates; the figures as a dict."""
    apply_quick(args, QUICK)
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model

    if args.preset not in [p.value for p in Preset]:
        raise FabricError(f"--preset {args.preset!r}: choose from {[p.value for p in Preset]}")
    if args.prefix_tokens < BLOCK_SIZE or min(args.turn_tokens, args.rounds, args.read_rounds) < 1:
        raise FabricError("--prefix-tokens >= 16; --turn-tokens, --rounds, --read-rounds >= 1")
    needs_two_cpus("instances")
    run_dir = make_run_dir(args.run_dir, "fabric-bench-node-", _log)
    model_dir = ensure_model(args.preset)
    vocab = PRESET_CONFIGS[Preset(args.preset)].vocab_size
    load_before = os.getloadavg()
    measured = _ttft(args, run_dir, vocab)
    reads = _reads(args, model_dir, run_dir)
    return _report(args, measured, reads, load_before)


# -- TTFT ------------------------------------------------------------------------------------------


def _ttft(args: argparse.Namespace, run_dir: Path, vocab: int) -> list[Measured]:
    measured: list[Measured] = []
    start = functools.partial(_start, args, run_dir)
    with deployed(run_dir, vocab, len(WORKERS), start, _log) as deployment:
        _warm_up(deployment, args)
        for r in range(args.rounds):
            measured += _round(deployment, args, r)
    return measured


def _start(args: argparse.Namespace, run_dir: Path, etcd: str, children: list[Child]) -> str:
    context_blocks = -(-(args.prefix_tokens + args.turn_tokens + args.max_tokens) // BLOCK_SIZE)
    device = ["--block-size", str(BLOCK_SIZE), "--device-blocks", str(context_blocks * 5 // 4)]
    host = ["--host-blocks", str(4 * context_blocks)]
    g4 = ["--shared-disk-dir", str(run_dir / G4_DIR)]
    g4 += ["--shared-disk-blocks", str(4 * (args.rounds + 1) * context_blocks)]
    namespace = f"bench-node-{os.getpid()}"
    env = {"FABRIC_NODE_NAME": f"bench-node-{os.getpid()}"}  # its own segment
    node = start_node_cache(
        children,
        etcd=etcd,
        model=args.preset,
        shm_gb=NODE_GB,
        run_dir=run_dir,
        env=env,
        timeout_s=STARTUP_S,
        namespace=namespace,
        progress=_log,
    )
    # C has nothing below its device: under another node name, so the router does not credit it
    # with this node's tier (which it does not attach to) and has it read the holder over NIXL
    elsewhere = ["--node-name", f"bench-no-node-cache-{os.getpid()}"]
    extra = {"A": node + host + g4, "B": node, "C": elsewhere, "D": g4}
    for name, cpu in WORKERS.items():
        start_worker(
            children,
            name,
            "aggregated",
            etcd=etcd,
            model=args.preset,
            namespace=namespace,
            cpus=cpu,
            threads=1,
            run_dir=run_dir,
            progress=_log,
            extra=device + extra[name],
            env=env,
            name=f"instance-{name}",
        )
    return start_frontend(
        children, etcd=etcd, model=args.preset, namespace=namespace, run_dir=run_dir, progress=_log
    )


def _warm_up(deployment: Deployment, args: argparse.Namespace) -> None:
    """First-call costs on a prompt nothing else uses: A computes it, B attaches to the node
    and loads it, C reads it over NIXL, D computes its own."""
    shared = seeded_tokens(deployment.vocab, 2 * BLOCK_SIZE + 3, ("warm", "A"))
    own = seeded_tokens(deployment.vocab, 2 * BLOCK_SIZE + 3, ("warm", "D"))
    for worker, prompt, local in (
        ("A", shared, True),
        ("B", shared, True),
        ("C", shared, False),
        ("D", own, True),
    ):
        routing = {"worker": worker, **({"prefill_worker": ""} if local else {})}
        deployment.send(prompt, args.max_tokens, routing)


def _round(deployment: Deployment, args: argparse.Namespace, r: int) -> list[Measured]:
    vocab = deployment.vocab
    turn = seeded_tokens(vocab, args.turn_tokens, ("turn", r))
    prompts = {c: seeded_tokens(vocab, args.prefix_tokens, (c, r)) + turn for c in ("X", "Y")}
    results = []
    for step in ROUND:
        if step.kind is Kind.G4_HIT:
            expected = (r + 1) * 2 * (args.prefix_tokens // BLOCK_SIZE)
            deployment.wait_for_store(expected)
        routing = {"worker": step.worker, **({"prefill_worker": ""} if step.local else {})}
        got = deployment.send(prompts[step.context], args.max_tokens, routing)
        result = Measured(step.kind, step.context, got.ttft_s * 1e3, got.text, got.fabric)
        _log(
            f"round {r} {step.kind.value:12} on {step.worker}: ttft {result.ttft_ms:8.1f} ms, "
            f"cached {got.fabric.get('cached_tokens')}, route {got.fabric.get('route')}"
        )
        results.append(result)
    return results


# -- P/D read rates --------------------------------------------------------------------------------


def _reads(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> dict[str, Any]:
    from fabric.bench import transfer
    from fabric.models.config import ModelConfig

    geometry = ModelConfig.from_dir(model_dir).kv_geometry()
    num_blocks = args.prefix_tokens // BLOCK_SIZE
    node = _node_read(geometry, num_blocks, args.read_rounds, model_dir, run_dir)
    block_bytes = node["block_bytes"]
    total_mib = num_blocks * block_bytes / 2**20
    if total_mib != int(total_mib) or block_bytes % 1024:
        raise FabricError(f"{num_blocks} blocks of {block_bytes} B are not whole MiB and KiB")
    _log(f"NIXL and memcpy: {int(total_mib)} MiB in {block_bytes >> 10} KiB blocks")
    row = transfer.run(
        argparse.Namespace(
            total_mib=int(total_mib),
            rounds=args.read_rounds,
            block_kib=str(block_bytes >> 10),
            hosts=False,  # both processes on this host, as a same-host P/D pair
        )
    )["rows"][0]
    return {
        "node_copy_only_gbps": node["copy_only_gbps"],
        "node_pinned_gbps": node["pinned_gbps"],
        "memcpy_paired_gbps": node["memcpy_paired_gbps"],
        "node_vs_memcpy_paired": node["paired_ratio"],
        "gbps": {
            "node": node["gbps"],
            "nixl": row["fabric_gbps"],
            "memcpy": row["memcpy_gbps"],
        },
        "bytes": num_blocks * block_bytes,
        "block_bytes": block_bytes,
        "verified": node["verified"] and row["verified"],
        "nixl_raw_gbps": row["nixl_gbps"],
    }


def _node_read(
    geometry: Any, num_blocks: int, rounds: int, model_dir: Path, run_dir: Path
) -> dict[str, Any]:
    """A node cache process; this process stores ``num_blocks`` blocks as one client, then
    loads them as another, ``rounds`` times (the first load verified)."""
    import subprocess

    node = f"bench-read-{os.getpid()}"
    cmd = [sys.executable, "-m", "fabric.node", f"--model={model_dir}", f"--node={node}"]
    cmd += [f"--blocks={num_blocks}", f"--block-size={BLOCK_SIZE}", "--namespace=bench"]
    with (run_dir / "node-read.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready = _ready_line(proc, log.name)
            return _store_then_load(ready, geometry, num_blocks, rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()


def _ready_line(proc: Any, log_name: str) -> dict[str, Any]:
    """The node cache's ready line (bounded wait)."""
    import json
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(STARTUP_S):
            raise FabricError(f"the node cache did not start in {STARTUP_S:.0f} s: {log_name}")
    line = proc.stdout.readline()
    if not line.startswith("{"):
        raise FabricError(f"the node cache did not start (see {log_name})")
    ready: dict[str, Any] = json.loads(line)
    return ready


def _store_then_load(
    ready: dict[str, Any], geometry: Any, num_blocks: int, rounds: int
) -> dict[str, Any]:
    """Store ``num_blocks`` random blocks as one client, load them ``rounds + 1`` times as
    another, through the slot index (no request) and through lookup + pin (each path's first
    load verified and not timed: it faults the pages in)."""
    import torch

    from fabric.kvbm import LayoutKind, SequenceHash, copy_blocks, host_storage
    from fabric.node import attach_node_cache

    layout = geometry.layout(LayoutKind.FULLY_CONTIGUOUS, num_blocks, BLOCK_SIZE)
    src, dst = host_storage(layout, pin=False), host_storage(layout, pin=False)
    threads = torch.get_num_threads()
    # One thread, as a worker copies (--threads 1): a 2-thread copy waits on a busy core.
    torch.set_num_threads(1)
    times: dict[bool, list[float]] = {True: [], False: []}
    memcpy: list[float] = []
    dst_bytes = dst.tensors[0].view(torch.uint8).numpy()
    verified = True
    try:
        src_bytes = src.tensors[0].view(torch.uint8)
        src_bytes.copy_(torch.randint(0, 256, src_bytes.shape, dtype=torch.uint8))
        hashes = [SequenceHash(1000 + i) for i in range(num_blocks)]
        ids = list(range(num_blocks))
        # a worker has copied blocks before: the copy kernels' first load (about a second,
        # more on a busy host) is not paid inside the store's lease
        copy_blocks(src, [0], dst, [0])
        attach = {"compat_hash": ready["compat_hash"], "layout": layout}
        with attach_node_cache(ready["endpoint"], identity="prefill", **attach) as writer:
            stored = writer.store(hashes, src, ids)
        if stored.num_stored != num_blocks:
            raise FabricError(f"the node cache stored {stored.num_stored} of {num_blocks} blocks")
        for optimistic in (True, False):
            identity = "decode" if optimistic else "decode-pinned"
            with attach_node_cache(
                ready["endpoint"], identity=identity, optimistic=optimistic, **attach
            ) as reader:
                for i in range(rounds + 1):
                    dst.tensors[0].view(torch.uint8).zero_()
                    began = time.perf_counter()
                    loaded = reader.load(hashes, dst, ids)
                    times[optimistic].append(time.perf_counter() - began)
                    if loaded != num_blocks:
                        raise FabricError(f"the node cache loaded {loaded} of {num_blocks}")
                    if i == 0:
                        verified = verified and torch.equal(
                            src_bytes, dst.tensors[0].view(torch.uint8)
                        )
                    elif optimistic:  # the same bytes by np.copyto, right after: paired
                        memcpy.append(_memcpy_s(src_bytes.numpy(), dst_bytes))
                if optimistic and reader.num_optimistic_loads != rounds + 1:
                    raise FabricError("the node reads did not go through the slot index")
                if not optimistic:
                    copies = _copy_times(reader, hashes, dst, rounds)
    finally:
        torch.set_num_threads(threads)
        src.close()
        dst.close()
    total = num_blocks * layout.block_bytes
    return {
        "gbps": round(total / statistics.median(times[True][1:]) / 1e9, 3),
        "pinned_gbps": round(total / statistics.median(times[False][1:]) / 1e9, 3),
        "memcpy_paired_gbps": round(total / statistics.median(memcpy) / 1e9, 3),
        "paired_ratio": round(
            statistics.median(m / t for m, t in zip(memcpy, times[True][1:], strict=True)), 3
        ),
        "copy_only_gbps": round(total / statistics.median(copies) / 1e9, 3),
        "block_bytes": layout.block_bytes,
        "verified": verified,
    }


def _memcpy_s(src: Any, dst: Any) -> float:
    """Seconds of one ``np.copyto`` of ``src`` into ``dst`` (this process's memcpy)."""
    import numpy as np

    began = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - began


def _copy_times(reader: Any, hashes: list[Any], dst: Any, rounds: int) -> list[float]:
    """The copy out of the segment alone (one pin held around ``rounds`` copies): what a load
    costs without finding its blocks."""
    from fabric.kvbm import copy_blocks

    pinned = reader.lookup(hashes)
    ids = list(range(len(hashes)))
    times = []
    try:
        for _ in range(rounds):
            began = time.perf_counter()
            copy_blocks(reader.storage, pinned.slot_ids, dst, ids)
            times.append(time.perf_counter() - began)
    finally:
        reader.release(pinned.lease_id)
    return times


# -- report ----------------------------------------------------------------------------------------


def _report(
    args: argparse.Namespace,
    measured: list[Measured],
    reads: dict[str, Any],
    load_before: tuple[float, ...],
) -> dict[str, Any]:
    by_kind: dict[Kind, list[Measured]] = defaultdict(list)
    for m in measured:
        by_kind[m.kind].append(m)
    figures = kind_figures({k.value: by_kind[k] for k in Kind})
    ttft = figures["ttft_ms"]
    # round r's recompute of X+U is the reference of its hits
    per_round = len(ROUND)
    equal = True
    for start in range(0, len(measured), per_round):
        batch = measured[start : start + per_round]
        reference = batch[0].text
        equal = equal and all(m.text == reference for m in batch if m.context == "X")
    node, host, recompute = ttft["node_hit"], ttft["own_host_hit"], ttft["recompute"]
    paired = statistics.median(
        n.ttft_ms / h.ttft_ms
        for n, h in zip(by_kind[Kind.NODE_HIT], by_kind[Kind.OWN_HOST_HIT], strict=True)
    )
    pd = reads["gbps"]
    return {
        "ttft_ms": ttft,
        "outputs_equal": equal,
        "pd_read_gbps": pd,
        "goals": {
            "node_hit_vs_own_host_hit": {
                "ratio": round(node / host, 3),
                "per_round_ratio_p50": round(paired, 3),
                "max": GOALS["node_vs_own_host_max"],
                "met": node / host <= GOALS["node_vs_own_host_max"],
            },
            "node_hit_speedup_vs_recompute": {
                "ratio": round(recompute / node, 2),
                "min": GOALS["node_speedup_min"],
                "met": recompute / node >= GOALS["node_speedup_min"],
            },
            "node_read_vs_memcpy": {
                "ratio": round(pd["node"] / pd["memcpy"], 3),
                "min": GOALS["node_read_vs_memcpy_min"],
                "met": pd["node"] / pd["memcpy"] >= GOALS["node_read_vs_memcpy_min"],
            },
        },
        "cached_tokens": figures["cached_tokens"],
        "kv_sources": figures["kv_sources"],
        "ttft_ms_all": figures["ttft_ms_all"],
        "worker_ms_p50": {  # as the serving worker measured them (``fabric`` field)
            k.value: {name: stat_p50((m.fabric for m in by_kind[k]), name) for name in WORKER_STATS}
            for k in Kind
        },
        "reads": {k: v for k, v in reads.items() if k != "gbps"},
        "params": {
            "preset": args.preset,
            "prefix_tokens": args.prefix_tokens,
            "turn_tokens": args.turn_tokens,
            "rounds": args.rounds,
            "read_rounds": args.read_rounds,
            "max_tokens": args.max_tokens,
            "block_size": BLOCK_SIZE,
            "node_cache_gb": NODE_GB,
            "instances": {name: f"aggregated@cpu{cpu}x1t" for name, cpu in WORKERS.items()},
            "round": [f"{s.worker}:{s.context}+U:{s.kind.value}" for s in ROUND],
        },
        "machine": machine(load_before),
    }


def _log(message: str) -> None:
    print(f"node-cache: {message}", file=sys.stderr, flush=True)
