"""Prefix hits by tier: TTFT of a recompute against device, host, shared-disk and peer hits.

One deployment the way ``fabric launch`` starts one: a private etcd and three aggregated workers
(instance A pinned to core 0, B and C to core 1, ``--threads 1`` each; never two busy at once) with
a device pool of about 1.25 contexts and a host pool of several; A and B share one G4 directory, C
has none (so its hits can only come from a peer), behind the OpenAI frontend. Logs go under
``--run-dir``; every process is stopped when ``run`` returns or fails.

Workload: ``--rounds`` conversations, each two contexts X and Y of ``--prefix-tokens`` (a system
prompt plus history: the reusable prefix) and one user turn U of ``--turn-tokens``, all random
token ids (seeded), sent as streamed ``/v1/completions`` pinned to an instance with the
request's ``fabric.worker`` field. Each round sends, in this order::

    1 A  X+U   recompute    nothing holds X
    2 A  X+U   device_hit   A's device holds X
    3 C  X+U   peer_hit     the router sees A hold X (KV events) and has C read it over NIXL
    4 A  Y+U   recompute    evicts X from A's device (A's host and G4 keep it)
    5 A  X+U   host_hit     A onboards X from its host tier
    6 B  Y+U   disk_hit     forced local (``prefill_worker: ""``): B finds Y in G4, written by A

Before step 6 the benchmark waits (bounded) until A's write-through has put Y's blocks in G4.
Every hit repeats a prompt whose recompute was measured, so ``outputs_equal`` compares each hit's
completion with its recompute's (greedy decoding: equal texts mean equal tokens).

Then a multi-turn phase (``--conversations`` x ``--turns``): every conversation opens with one
shared system prompt of ``prefix_tokens / 2`` tokens, and turn k of conversation c appends a
new user message of ``--turn-tokens`` to the conversation so far and goes to instance
``(c + k) % 2`` (A or B), the KV source left to the router (a peer hit when the other instance
holds the history; the serving instance computes the tail itself when G4 already gave it every
full block). Its ``hit_rate`` is the prompt tokens served from any cache over the reusable prefix
tokens (per request: the full blocks it shares with the longest earlier prompt), with the route
kinds and TTFT p50 of its requests. (Answers are not appended: the bench sends token ids and
gets text back, and a re-tokenized answer need not be the ids the worker cached.)

Output: ``ttft_ms`` (p50 per kind), ``speedup_vs_recompute`` (recompute p50 over the kind's p50),
``hit_rate`` (of the multi-turn phase), ``tier_rounds_hit_rate`` (the same over the rounds' hit
requests: the prompt's full blocks), per-kind ``cached_tokens`` and ``routes`` as the responses
report them, the worker-reported ``prefill_ms_p50`` (prompt compute, on the KV source for a peer
hit) and ``kv_transfer_ms_p50`` (the NIXL read) per kind, ``goals`` (host and peer >= 30x, disk
>= 20x), ``outputs_equal``, the parameters and the machine. TTFT is timed at the client (HTTP
and routing included).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fabric.bench.deployment import (
    G4_DIR,
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
from fabric.bench.svg_chart import bar_chart
from fabric.errors import FabricError
from fabric.supervise import Child

BLOCK_SIZE = 16
GOALS = {"host_hit": 30.0, "peer_hit": 30.0, "disk_hit": 20.0}
QUICK = {
    "preset": "tiny",
    "prefix_tokens": 256,
    "turn_tokens": 21,
    "rounds": 1,
    "max_tokens": 4,
    "conversations": 2,
    "turns": 3,
}


class Kind(Enum):
    RECOMPUTE = "recompute"
    DEVICE_HIT = "device_hit"
    HOST_HIT = "host_hit"
    DISK_HIT = "disk_hit"
    PEER_HIT = "peer_hit"


@dataclass(frozen=True, slots=True)
class Step:
    """One request of a round: the instance, the context (X or Y), what it measures, and a
    forced KV source (None: the router chooses)."""

    worker: str
    context: str
    kind: Kind
    prefill_worker: str | None = None


ROUND = (
    Step("A", "X", Kind.RECOMPUTE),
    Step("A", "X", Kind.DEVICE_HIT),
    Step("C", "X", Kind.PEER_HIT),
    Step("A", "Y", Kind.RECOMPUTE),
    Step("A", "X", Kind.HOST_HIT),
    Step("B", "Y", Kind.DISK_HIT, prefill_worker=""),
)
WORKERS = {"A": "0", "B": "1", "C": "1"}  # instance -> CPU
WITH_G4 = ("A", "B")
"""C has no G4: its hits can only come from a peer (B would find A's blocks in G4 itself)."""


@dataclass(slots=True)
class Measured:
    kind: Kind
    ttft_ms: float
    text: str
    prompt_tokens: int
    fabric: dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``prefix`` subcommand's flags."""
    parser.add_argument("--preset", default="small", help="model preset (%(default)s)")
    parser.add_argument(
        "--prefix-tokens", type=int, default=2048, help="reusable context length (%(default)s)"
    )
    parser.add_argument(
        "--turn-tokens",
        type=int,
        default=37,
        help="new tokens per request after the context; not a multiple of the block size, so "
        "a hit still computes a partial block (%(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="conversations (%(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request")
    parser.add_argument(
        "--conversations", type=int, default=2, help="multi-turn phase: conversations"
    )
    parser.add_argument("--turns", type=int, default=4, help="multi-turn phase: turns each")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument(
        "--plot", type=Path, default=None, help="also write the TTFT p50s as an SVG bar chart"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset, 256-token contexts, 1 round (tests)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the deployment, send every round, stop everything; the figures as a dict."""
    apply_quick(args, QUICK)
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model

    if args.preset not in [p.value for p in Preset]:
        raise FabricError(f"--preset {args.preset!r}: choose from {[p.value for p in Preset]}")
    if args.prefix_tokens < BLOCK_SIZE or args.turn_tokens < 1 or args.rounds < 1:
        raise FabricError("--prefix-tokens >= 16, --turn-tokens >= 1 and --rounds >= 1 needed")
    if min(args.max_tokens, args.conversations, args.turns) < 1:
        raise FabricError("--max-tokens, --conversations and --turns must be >= 1")
    needs_two_cpus("instances")
    run_dir = make_run_dir(args.run_dir, "fabric-bench-prefix-", _log)
    ensure_model(args.preset)
    vocab = PRESET_CONFIGS[Preset(args.preset)].vocab_size
    load_before = os.getloadavg()
    measured: list[Measured] = []
    start = functools.partial(_start, args, run_dir)
    with deployed(run_dir, vocab, len(WORKERS), start, _log) as deployment:
        _warm_up(deployment, args)
        for r in range(args.rounds):
            measured += _round(deployment, args, r)
        turns = _conversations(deployment, args)
    report = _report(args, measured, turns, load_before)
    if args.plot is not None:
        title = (
            f"TTFT p50, {args.prefix_tokens}-token prefix + {args.turn_tokens}, "
            f"{args.preset} preset (python -m fabric.bench prefix)"
        )
        args.plot.write_text(bar_chart(report["ttft_ms"], title=title, unit="ms"))
        _log(f"plot written to {args.plot}")
    return report


def _start(args: argparse.Namespace, run_dir: Path, etcd: str, children: list[Child]) -> str:
    context_blocks = -(-(args.prefix_tokens + args.turn_tokens + args.max_tokens) // BLOCK_SIZE)
    tiers = [
        "--block-size",
        str(BLOCK_SIZE),
        "--device-blocks",
        str(context_blocks + context_blocks // 4),  # one context: the next evicts it
        "--host-blocks",
        str(4 * context_blocks),
    ]
    g4 = [
        "--shared-disk-dir",
        str(run_dir / G4_DIR),
        "--shared-disk-blocks",
        str(4 * (args.rounds + 1) * context_blocks),
    ]
    namespace = f"bench-prefix-{os.getpid()}"
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
            extra=tiers + g4 if name in WITH_G4 else tiers,
            name=f"instance-{name}",
        )
    return start_frontend(
        children, etcd=etcd, model=args.preset, namespace=namespace, run_dir=run_dir, progress=_log
    )


def _warm_up(deployment: Deployment, args: argparse.Namespace) -> None:
    """First-call costs out of the way, on prompts nothing else uses: A computes one, C reads
    it from A (the NIXL connection between them), B computes its own."""
    shared = seeded_tokens(deployment.vocab, 2 * BLOCK_SIZE + 3, ("warm", "A"))
    own = seeded_tokens(deployment.vocab, 2 * BLOCK_SIZE + 3, ("warm", "B"))
    for worker, prompt in (("A", shared), ("C", shared), ("B", own)):
        deployment.send(prompt, args.max_tokens, {"worker": worker})


def _round(deployment: Deployment, args: argparse.Namespace, r: int) -> list[Measured]:
    vocab = deployment.vocab
    turn = seeded_tokens(vocab, args.turn_tokens, ("turn", r))
    prompts = {c: seeded_tokens(vocab, args.prefix_tokens, (c, r)) + turn for c in ("X", "Y")}
    results = []
    for step in ROUND:
        if step.kind is Kind.DISK_HIT:
            deployment.wait_for_store((r + 1) * 2 * (args.prefix_tokens // BLOCK_SIZE))
        routing: dict[str, Any] = {"worker": step.worker}
        if step.prefill_worker is not None:
            routing["prefill_worker"] = step.prefill_worker
        got = deployment.send(prompts[step.context], args.max_tokens, routing)
        result = Measured(
            step.kind, got.ttft_s * 1e3, got.text, len(prompts[step.context]), got.fabric
        )
        _log(
            f"round {r} {step.kind.value:10} on {step.worker}: ttft {result.ttft_ms:8.1f} ms, "
            f"cached {got.fabric.get('cached_tokens')}, route {got.fabric.get('route')}"
        )
        results.append(result)
    return results


@dataclass(slots=True)
class Turn:
    """One request of the multi-turn phase, with its reusable prefix as the bench computes it."""

    ttft_ms: float
    reusable_tokens: int
    cached_tokens: int
    route: str


def _conversations(deployment: Deployment, args: argparse.Namespace) -> list[Turn]:
    """The multi-turn phase (module docstring); the router chooses every KV source."""
    system = seeded_tokens(deployment.vocab, args.prefix_tokens // 2, ("system", 0))
    earlier: list[list[int]] = []
    turns = []
    for c in range(args.conversations):
        history = list(system)
        for k in range(args.turns):
            history += seeded_tokens(deployment.vocab, args.turn_tokens, ("user", c * 1000 + k))
            worker = "AB"[(c + k) % 2]
            got = deployment.send(history, args.max_tokens, {"worker": worker})
            shared = max((_common_prefix(p, history) for p in earlier), default=0)
            turn = Turn(
                got.ttft_s * 1e3,
                shared // BLOCK_SIZE * BLOCK_SIZE,
                int(got.fabric.get("cached_tokens", 0)),
                str(got.fabric.get("route")),
            )
            _log(
                f"conversation {c} turn {k} on {worker}: ttft {turn.ttft_ms:8.1f} ms, cached "
                f"{turn.cached_tokens} of {turn.reusable_tokens} reusable, route {turn.route}"
            )
            turns.append(turn)
            earlier.append(list(history))
    return turns


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _report(
    args: argparse.Namespace,
    measured: list[Measured],
    turns: list[Turn],
    load_before: tuple[float, ...],
) -> dict[str, Any]:
    by_kind: dict[Kind, list[Measured]] = defaultdict(list)
    for m in measured:
        by_kind[m.kind].append(m)
    figures = kind_figures({k.value: by_kind[k] for k in Kind})
    ttft = figures["ttft_ms"]
    base = ttft[Kind.RECOMPUTE.value]
    speedups = {k: round(base / v, 2) for k, v in ttft.items() if k != Kind.RECOMPUTE.value}
    hits = [m for m in measured if m.kind is not Kind.RECOMPUTE]
    reusable = sum(m.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE for m in hits)
    cached = sum(int(m.fabric.get("cached_tokens", 0)) for m in hits)
    turn_cached = sum(t.cached_tokens for t in turns)
    turn_reusable = sum(t.reusable_tokens for t in turns)
    # each round's recomputes are the references: X+U first, Y+U second
    references: dict[tuple[int, str], str] = {}
    equal = True
    for index, m in enumerate(measured):
        r, step = divmod(index, len(ROUND))
        key = (r, ROUND[step].context)
        if m.kind is Kind.RECOMPUTE:
            references[key] = m.text
        else:
            equal = equal and m.text == references[key]
    return {
        "ttft_ms": ttft,
        "speedup_vs_recompute": speedups,
        "hit_rate": _ratio(turn_cached, turn_reusable),
        "tier_rounds_hit_rate": _ratio(cached, reusable),
        "conversations": {
            "requests": len(turns),
            "reusable_tokens": turn_reusable,
            "cached_tokens": turn_cached,
            "routes": dict(sorted(Counter(t.route for t in turns).items())),
            "ttft_ms_p50": round(statistics.median(t.ttft_ms for t in turns), 3),
        },
        "cached_tokens": figures["cached_tokens"],
        "routes": {k.value: sorted({str(m.fabric.get("route")) for m in by_kind[k]}) for k in Kind},
        "kv_sources": figures["kv_sources"],
        "ttft_ms_all": figures["ttft_ms_all"],
        "prefill_ms_p50": {
            k.value: stat_p50((m.fabric for m in by_kind[k]), "prefill_ms") for k in Kind
        },
        "kv_transfer_ms_p50": {
            k.value: stat_p50((m.fabric for m in by_kind[k]), "kv_transfer_ms") for k in Kind
        },
        "goals": {k: {"min_speedup": g, "met": speedups[k] >= g} for k, g in GOALS.items()},
        "outputs_equal": equal,
        "params": {
            "preset": args.preset,
            "prefix_tokens": args.prefix_tokens,
            "turn_tokens": args.turn_tokens,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "conversations": args.conversations,
            "turns": args.turns,
            "block_size": BLOCK_SIZE,
            "instances": {name: f"aggregated@cpu{cpu}x1t" for name, cpu in WORKERS.items()},
            "round": [f"{s.worker}:{s.context}+U:{s.kind.value}" for s in ROUND],
        },
        "machine": machine(load_before),
    }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _log(message: str) -> None:
    print(f"prefix: {message}", file=sys.stderr, flush=True)
