"""Serving end to end: aggregated vs 1P1D through the OpenAI frontend, one workload, client timings.

For every preset, one deployment per mode is started on this host the way ``fabric launch`` starts
one (``fabric.launch``'s commands, supervised by ``fabric.supervise``: a private etcd shared
by all, each deployment in its own discovery namespace with its own frontend; logs under
``--run-dir``):

* ``aggregated``: one aggregated worker pinned to core 1, ``--threads 1``;
* ``disaggregated``: a prefill worker pinned to core 0 and a decode worker pinned to core 1,
  ``--threads 1`` each (1P1D);
* ``aggregated-2t``: one aggregated worker on cores 0-1, ``--threads 2`` (both cores for one
  engine: what the P/D pair's two cores would give a single engine).

The aggregated worker gets one thread on one core, like each P/D worker, so the comparison is
per worker; it sits on the decode worker's core because the frontend, etcd and this client are
not pinned and share the cores with whoever decodes. All deployments of a preset run at once
and take turns request by request (the order alternates), so background load hits every mode
alike; an idle worker waits on its inbox and costs nothing. Every started process is stopped when
``run`` returns, fails or gets SIGTERM; start-up and each request have bounded waits.

Workload: sequential streamed ``/v1/completions`` requests, greedy, ``max_tokens`` each. A
prompt is ``prompt_tokens`` token ids drawn uniformly from ``[2, vocab)`` by a generator seeded
with (prompt length, request index), sent as ids (no tokenizer round trip); every request has
its own prompt (``cached_tokens_max`` shows prefix caching served nothing) and every mode gets
the same prompts. One warm-up request (its own prompt, the shortest length) per deployment
is not measured.

One row per (preset, mode, prompt length):

* ``preset``, ``mode``, ``prompt_tokens``: what ran; ``num_requests``: requests measured;
* ``ttft_ms_p50``: median time from sending a request to its first content chunk, at the client;
* ``ttft_overhead_ms_p50``: median of (client TTFT - ``prefill_ms``) per request: what a request
  pays beyond prompt compute (HTTP, routing, signals, queueing, the KV read, the first token's
  way back), free of the compute's own noise;
* ``itl_ms_p50``: median gap between consecutive content chunks (one token each), at the client;
* ``tokens_per_s``: completion tokens over the summed wall time of the requests (send to last
  event): end-to-end throughput of sequential requests, prefill included;
* ``kv_transfer_ms_p50``: median of the decode worker's ``kv_transfer_ms`` (NIXL read of the
  prompt's KV) from the responses' ``fabric`` field; null where nothing is transferred;
* ``prefill_ms_p50``: median prompt compute time the serving worker reports (``prefill_ms``);
* ``cached_tokens_max``: most prompt tokens any request found cached (0: all computed);
* ``completion_tokens``: completion tokens of all measured requests (``usage``);
* ``outputs_equal``: every request's completion text equals the ``aggregated`` mode's for the
  same prompt (greedy decoding, so equal texts mean equal tokens); null on ``aggregated`` itself.

``ratios`` gives, per preset and prompt length, each other mode over ``aggregated``: ``ttft``
and ``itl`` (p50 over p50). Needs the deployments' usual ports on 127.0.0.1 and NIXL (UCX).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fabric.bench.deployment import (
    FIRST_TOKEN_ID,
    apply_quick,
    machine,
    make_run_dir,
    needs_two_cpus,
    request,
    start_frontend,
    start_worker,
    wait_serving,
)
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.supervise import Child, check_alive, private_etcd, sigterm_raises, stop_processes

QUICK = {
    "presets": "tiny",
    "prompt_tokens": "40,136",
    "requests": 2,
    "max_tokens": 8,
    "modes": "aggregated,disaggregated",
}


class Mode(Enum):
    AGGREGATED = "aggregated"
    DISAGGREGATED = "disaggregated"
    AGGREGATED_2T = "aggregated-2t"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker of a deployment: its role, the CPUs it is pinned to, its torch threads."""

    role: Role
    cpus: str
    threads: int


MODE_TO_WORKERS: dict[Mode, tuple[WorkerSpec, ...]] = {
    Mode.AGGREGATED: (WorkerSpec(Role.AGGREGATED, "1", 1),),
    Mode.DISAGGREGATED: (WorkerSpec(Role.PREFILL, "0", 1), WorkerSpec(Role.DECODE, "1", 1)),
    Mode.AGGREGATED_2T: (WorkerSpec(Role.AGGREGATED, "0-1", 2),),
}
REFERENCE = Mode.AGGREGATED


@dataclass(frozen=True, slots=True)
class Workload:
    """What every deployment is sent: ``num_requests`` prompts per length, ``max_tokens`` each."""

    prompt_lengths: tuple[int, ...]
    num_requests: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Deployment:
    """A running deployment: its mode, frontend URL and served model id."""

    mode: Mode
    url: str
    model: str


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one streamed completion."""

    ttft_ms: float
    gaps_ms: list[float]
    total_s: float
    text: str
    completion_tokens: int
    fabric: dict[str, Any]


@dataclass(slots=True)
class Cell:
    """The results of one (mode, prompt length) in request order."""

    results: list[RequestResult] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's flags."""
    parser.add_argument("--presets", default="tiny,small", help="model presets (%(default)s)")
    parser.add_argument(
        "--prompt-tokens", default="512,2048", help="prompt lengths in tokens (%(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=6, help="measured requests per cell (%(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="tokens per request (%(default)s)"
    )
    parser.add_argument(
        "--modes",
        default="aggregated,disaggregated,aggregated-2t",
        help=f"of {', '.join(m.value for m in Mode)}; aggregated is always run (%(default)s)",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny preset, prompts of 40 and 136 tokens, 2 requests, 8 tokens, aggregated and "
        "disaggregated only (for tests)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every preset's deployments and workload; every started process is stopped."""
    apply_quick(args, QUICK)
    from fabric.models.presets import Preset  # torch: only when running

    presets = _split(args.presets)
    known = [p.value for p in Preset]
    if not presets or any(p not in known for p in presets):
        raise FabricError(f"--presets {args.presets!r}: choose from {', '.join(known)}")
    lengths = tuple(int(n) for n in _split(args.prompt_tokens))
    try:
        modes = [REFERENCE] + [Mode(m) for m in _split(args.modes) if Mode(m) is not REFERENCE]
    except ValueError as exc:
        raise FabricError(f"--modes: {exc}; choose from {[m.value for m in Mode]}") from exc
    if args.requests < 1 or args.max_tokens < 2 or not lengths or min(lengths) < 1:
        raise FabricError("--requests >= 1, --max-tokens >= 2 and positive --prompt-tokens needed")
    needs_two_cpus("workers")
    run_dir = make_run_dir(args.run_dir, "fabric-bench-serve-", _log)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    workload = Workload(lengths, args.requests, args.max_tokens)
    with sigterm_raises(), private_etcd(run_dir) as etcd:
        for preset in presets:
            cells = _run_preset(preset, modes, workload, etcd, run_dir)
            preset_rows = _rows(preset, modes, workload, cells)
            rows += preset_rows
            ratios += _ratios(preset_rows)
    return {
        "rows": rows,
        "ratios": ratios,
        "params": {
            "presets": presets,
            "prompt_tokens": list(lengths),
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "modes": [m.value for m in modes],
            "workers": {
                m.value: [f"{w.role.value}@cpu{w.cpus}x{w.threads}t" for w in MODE_TO_WORKERS[m]]
                for m in modes
            },
            "prompts": "token ids, uniform in [2, vocab), distinct per request, same per mode",
            "outputs_compared": "completion text per request",
        },
        "machine": machine(load_before),
    }


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _log(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


def _run_preset(
    preset: str,
    modes: list[Mode],
    workload: Workload,
    etcd: str,
    run_dir: Path,
) -> dict[tuple[Mode, int], Cell]:
    """Start one deployment per mode, warm each, send every prompt to each in turn."""
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model

    ensure_model(preset)  # before any worker starts, so creation is not part of start-up
    vocab = PRESET_CONFIGS[Preset(preset)].vocab_size
    children: list[Child] = []
    cells = {(mode, n): Cell() for mode in modes for n in workload.prompt_lengths}
    try:
        deployments = _start_all(preset, modes, etcd, run_dir, children)
        warm = _prompt(vocab, min(workload.prompt_lengths), index=-1)
        for deployment in deployments:
            _log(f"{preset} {deployment.mode.value}: warm-up")
            _request(deployment, warm, workload.max_tokens)
        for n in workload.prompt_lengths:
            for i in range(workload.num_requests):
                prompt = _prompt(vocab, n, index=i)
                turn = deployments if i % 2 == 0 else deployments[::-1]
                for deployment in turn:
                    check_alive(children)
                    result = _request(deployment, prompt, workload.max_tokens)
                    cells[(deployment.mode, n)].results.append(result)
                    _log(
                        f"{preset} {deployment.mode.value} {n} tokens #{i}: ttft "
                        f"{result.ttft_ms:.0f} ms, {result.completion_tokens} tokens"
                    )
    finally:
        stop_processes(children, progress=_log)
    return cells


def _start_all(
    preset: str, modes: list[Mode], etcd: str, run_dir: Path, children: list[Child]
) -> list[Deployment]:
    """Start every mode's workers and frontend (appending to ``children``), wait until ready."""
    urls: list[tuple[Mode, str, int]] = []
    for mode in modes:
        namespace = f"bench-{preset}-{mode.value}-{os.getpid()}"
        workers = MODE_TO_WORKERS[mode]
        for index, spec in enumerate(workers):
            start_worker(
                children,
                f"{preset}-{mode.value}-{spec.role.value}-{index}",
                spec.role.value,
                etcd=etcd,
                model=preset,
                namespace=namespace,
                cpus=spec.cpus,
                threads=spec.threads,
                run_dir=run_dir,
                progress=_log,
            )
        url = start_frontend(
            children,
            etcd=etcd,
            model=preset,
            namespace=namespace,
            run_dir=run_dir,
            progress=_log,
            name=f"{preset}-{mode.value}-frontend",
        )
        urls.append((mode, url, len(workers)))
    deployments = []
    for mode, url, num_workers in urls:
        deployments.append(Deployment(mode, url, wait_serving(url, children, num_workers, _log)))
        _log(f"{preset} {mode.value}: ready at {url}")
    return deployments


def _prompt(vocab: int, num_tokens: int, *, index: int) -> list[int]:
    """Deterministic random token ids, distinct per (length, index); ``index=-1``: warm-up."""
    rng = np.random.default_rng([num_tokens, index + 1, 0x5E7E])
    return [int(t) for t in rng.integers(FIRST_TOKEN_ID, vocab, num_tokens)]


def _request(deployment: Deployment, prompt: list[int], max_tokens: int) -> RequestResult:
    """One streamed completion, timed at the client: TTFT, per-chunk gaps, text, stats."""
    try:
        got = request(deployment.url, deployment.model, prompt, max_tokens)
    except FabricError as exc:
        raise FabricError(f"{deployment.mode.value}: {exc}") from exc
    return RequestResult(
        ttft_ms=got.ttft_s * 1e3,
        gaps_ms=[(b - a) * 1e3 for a, b in itertools.pairwise(got.arrivals)],
        total_s=got.total_s,
        text=got.text,
        completion_tokens=got.completion_tokens,
        fabric=got.fabric,
    )


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _rows(
    preset: str,
    modes: list[Mode],
    workload: Workload,
    cells: dict[tuple[Mode, int], Cell],
) -> list[dict[str, Any]]:
    """One row per (mode, prompt length) of ``preset`` (columns: the module docstring)."""
    rows = []
    for n in workload.prompt_lengths:
        reference = [r.text for r in cells[(REFERENCE, n)].results]
        for mode in modes:
            results = cells[(mode, n)].results
            tokens = sum(r.completion_tokens for r in results)
            transfers = [
                float(r.fabric["kv_transfer_ms"])
                for r in results
                if r.fabric.get("transferred_blocks")
            ]
            rows.append(
                {
                    "preset": preset,
                    "mode": mode.value,
                    "prompt_tokens": n,
                    "num_requests": len(results),
                    "ttft_ms_p50": _p50([r.ttft_ms for r in results]),
                    "ttft_overhead_ms_p50": _p50(
                        [r.ttft_ms - float(r.fabric["prefill_ms"]) for r in results]
                    ),
                    "itl_ms_p50": _p50([g for r in results for g in r.gaps_ms]),
                    "tokens_per_s": round(tokens / sum(r.total_s for r in results), 3),
                    "kv_transfer_ms_p50": _p50(transfers),
                    "prefill_ms_p50": _p50([float(r.fabric["prefill_ms"]) for r in results]),
                    "cached_tokens_max": max(int(r.fabric["cached_tokens"]) for r in results),
                    "completion_tokens": tokens,
                    "outputs_equal": None
                    if mode is REFERENCE
                    else [r.text for r in results] == reference,
                }
            )
    return rows


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each non-reference row's TTFT and ITL over the reference row's (same preset, length)."""
    reference = {r["prompt_tokens"]: r for r in rows if r["mode"] == REFERENCE.value}
    ratios = []
    for row in rows:
        base = reference[row["prompt_tokens"]]
        if row is base:
            continue
        ratios.append(
            {
                "preset": row["preset"],
                "prompt_tokens": row["prompt_tokens"],
                "mode": row["mode"],
                "ttft": _ratio(row["ttft_ms_p50"], base["ttft_ms_p50"]),
                "itl": _ratio(row["itl_ms_p50"], base["itl_ms_p50"]),
            }
        )
    return ratios


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None
