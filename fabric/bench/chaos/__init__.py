"""Chaos: faults against a real 1P1D deployment (kill -9, etcd stalls, bad input), one row each.

Starts, as ``fabric launch`` does (``fabric.bench.chaos.deployment``), a private etcd, a prefill
worker (core 0), a decode worker (core 1) and their frontend on ``--preset`` (tiny), plus an
aggregated reference deployment in its own namespace whose greedy texts every served text is
compared with. Then runs each fault of ``--faults`` in turn; each restores the deployment before
the next (a killed worker restarts under the same worker id):

* ``kill_prefill``: SIGKILL the prefill worker while requests that need it are in flight;
* ``kill_decode``: SIGKILL the decode worker while it streams;
* ``etcd_pause``: SIGSTOP etcd for ``--etcd-pause-s`` while a request arrives every 0.5 s;
* ``etcd_kill``: SIGKILL etcd, start it again on the same port and data directory;
* ``registration_deleted``: delete the decode worker's record; recovery is until it is back;
* ``same_id_restart``: SIGKILL and restart the prefill worker; P/D requests must read its KV
  again (only those count as ``ok``);
* ``burst``: ``--burst`` requests at once: each served or refused with 429/503 within 2 s;
* ``malformed_http``: bad JSON, wrong types, a lone surrogate, 20 MB bodies: each a 4xx JSON
  (``failed_clearly`` counts those), ``/health`` timed meanwhile;
* ``malformed_wire``: random, truncated and oversized msgpack frames to the prefill worker's
  signal endpoint; it must keep serving P/D requests.

One row per fault, keys ``fault``, ``ok`` (served, text equal to the reference), ``failed_clearly``
(4xx/5xx error JSON or an SSE error event within the bound), ``hung`` (no answer within
``--request-bound``), ``wrong_outputs``, ``leaked_blocks`` (``fabric_kvbm_blocks_in_use`` over
both workers once idle), ``leaked_holds`` (``held_handoffs``, active and waiting requests on the
workers, in-flight and queued requests on the frontend, once idle), ``recovery_s`` (see
``context``; null where not applicable), ``notes``. "Once idle": the gauges are scraped until all
read 0 or ``--settle`` seconds passed (default: the prefill's hold timeout plus 5 s).

Every started process is stopped when ``run`` returns, fails or gets SIGTERM; every wait is
bounded. Needs 2 CPUs, NIXL (UCX) and an etcd binary.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.bench.chaos.context import Context, Observed

QUICK: dict[str, Any] = {
    "etcd_pause_s": 6.0,
    "burst": 24,
    "in_flight": 3,
    "malformed_rounds": 1,
    "wire_frames": 24,
    "after_s": 1.0,
}
"""``--quick``: fewer requests and a 6 s etcd pause (still past the 5 s lease TTL)."""


def _faults() -> dict[str, Callable[[Context], Observed]]:
    from fabric.bench.chaos import etcd_faults, malformed, process_faults

    return {
        "kill_prefill": process_faults.kill_prefill,
        "kill_decode": process_faults.kill_decode,
        "etcd_pause": etcd_faults.etcd_pause,
        "etcd_kill": etcd_faults.etcd_kill,
        "registration_deleted": etcd_faults.registration_deleted,
        "same_id_restart": process_faults.same_id_restart,
        "burst": process_faults.burst,
        "malformed_http": malformed.malformed_http,
        "malformed_wire": malformed.malformed_wire,
    }


FAULT_NAMES = (
    "kill_prefill",
    "kill_decode",
    "etcd_pause",
    "etcd_kill",
    "registration_deleted",
    "same_id_restart",
    "burst",
    "malformed_http",
    "malformed_wire",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``chaos`` subcommand's flags."""
    from fabric.models.presets import Preset

    parser.add_argument(
        "--faults", default=",".join(FAULT_NAMES), help="comma-separated, in this order (all)"
    )
    parser.add_argument("--etcd-pause-s", type=float, default=15.0, help="SIGSTOP length (s)")
    parser.add_argument("--burst", type=int, default=64, help="concurrent burst requests")
    parser.add_argument(
        "--preset",
        choices=[p.value for p in Preset],
        default=Preset.TINY.value,
        help="model preset of every worker (%(default)s)",
    )
    parser.add_argument("--in-flight", type=int, default=6, help="requests in flight at a kill")
    parser.add_argument("--request-bound", type=float, default=60.0, help="hung past this (s)")
    parser.add_argument("--settle", type=float, default=35.0, help="bound on idle after (s)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    parser.add_argument(
        "--stream-tokens", type=int, default=192, help="tokens of the requests kill_decode cuts"
    )
    parser.add_argument("--malformed-rounds", type=int, default=4, help="rounds of bad HTTP")
    parser.add_argument("--wire-frames", type=int, default=96, help="bad signal frames")
    parser.add_argument("--after-s", type=float, default=3.0, help="requests after a fault (s)")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a short run, for tests")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the deployments, run each fault, stop everything; the JSON result."""
    from fabric.bench.deployment import apply_quick, machine, make_run_dir, needs_two_cpus

    apply_quick(args, QUICK)
    names = [n.strip() for n in str(args.faults).split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULT_NAMES]
    if not names or unknown:
        raise FabricError(f"--faults {args.faults!r}: choose from {', '.join(FAULT_NAMES)}")
    needs_two_cpus("workers")
    from fabric.bench.chaos.context import Context, Settings
    from fabric.bench.chaos.deployment import ChaosDeployment, log
    from fabric.bench.chaos.outcomes import References
    from fabric.models.presets import PRESET_CONFIGS, Preset, ensure_model
    from fabric.supervise import sigterm_raises

    settings = Settings(
        bound_s=args.request_bound,
        settle_s=args.settle,
        etcd_pause_s=args.etcd_pause_s,
        burst=args.burst,
        in_flight=args.in_flight,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        stream_tokens=args.stream_tokens,
        interval_s=0.5,
        after_s=args.after_s,
        malformed_rounds=args.malformed_rounds,
        wire_frames=args.wire_frames,
        big_body_bytes=20 * 10**6,
    )
    run_dir = make_run_dir(args.run_dir, "fabric-bench-chaos-", log)
    preset = Preset(args.preset)
    ensure_model(preset.value)
    vocab = PRESET_CONFIGS[preset].vocab_size
    loads = [os.getloadavg()]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    deployment = ChaosDeployment(run_dir, preset.value, args.request_bound)
    with sigterm_raises():
        try:
            deployment.start()
            references = References(deployment.reference_url, deployment.model, settings.bound_s)
            context = Context(deployment, references, settings, vocab)
            for name in names:
                rows.append(_run_fault(name, context))
                loads.append(os.getloadavg())
        finally:
            deployment.close()
    return {
        "rows": rows,
        "params": {
            "preset": preset.value,
            "deployment": "1P1D: prefill@cpu0x1t, decode@cpu1x1t, frontend; private etcd",
            "faults": names,
            "quick": bool(args.quick),
            "request_bound_s": settings.bound_s,
            "settle_s": settings.settle_s,
            "etcd_pause_s": settings.etcd_pause_s,
            "burst": settings.burst,
            "in_flight_at_kill": settings.in_flight,
            "prompt_tokens": settings.prompt_tokens,
            "max_tokens": settings.max_tokens,
            "stream_tokens": settings.stream_tokens,
            "malformed_rounds": settings.malformed_rounds,
            "wire_frames": settings.wire_frames,
            "reference": f"aggregated {preset.value} worker, greedy, own namespace and frontend",
        },
        "machine": {
            **machine(loads[0]),
            "loadavg_1m_per_fault": [round(x[0], 2) for x in loads],
            "wall_s": round(time.monotonic() - started, 1),
        },
    }


def _run_fault(name: str, context: Context) -> dict[str, Any]:
    """One fault: healthy first, inject, finish the row, restart whatever died by itself."""
    from fabric.bench.chaos.context import ROW_KEYS, Observed, finish
    from fabric.bench.chaos.deployment import log

    deployment = context.deployment
    if deployment.wait_registered(context.settings.bound_s) is None:
        raise FabricError(f"the deployment is not whole before {name}")
    log(f"{name}: start")
    try:
        observed: Observed = _faults()[name](context)
    except FabricError as exc:  # a fault that could not be run: say so in its row
        observed = Observed([], None, [f"fault not completed: {exc}"], own_recovery=True)
    for worker_id in deployment.dead_workers():
        observed.notes.append(f"{worker_id} exited by itself: restarted")
        deployment.retire(worker_id)
        deployment.restart(worker_id, after_wall=time.time())
    row = finish(name, context, observed)
    assert tuple(row) == ROW_KEYS
    log(f"{name}: {row}")
    return row
