"""Faults on worker processes and on admission: kill -9 of each role, a same-id restart, a burst.

Each function injects one fault into the running 1P1D, restores the deployment (a killed worker
is started again under the same worker id) and returns what its requests saw (``Observed``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from fabric.bench.chaos.context import Context, Observed
from fabric.bench.chaos.deployment import DECODE, PREFILL
from fabric.bench.chaos.outcomes import Load, Outcome, Result, concurrently

PD_CHECKS = 3
"""Requests after a same-id restart that must take the P/D path."""
REFUSAL_GOAL_S = 2.0


def kill_prefill(context: Context) -> Observed:
    """SIGKILL the prefill worker while requests that need it are in flight; restart it."""
    return _kill_mid_request(context, "kill_prefill", PREFILL, "fabric_worker_requests_total")


def kill_decode(context: Context) -> Observed:
    """SIGKILL the decode worker while it streams; restart it."""
    return _kill_mid_request(context, "kill_decode", DECODE, "fabric_worker_generated_tokens_total")


def _kill_mid_request(context: Context, fault: str, worker_id: str, started: str) -> Observed:
    deployment, settings = context.deployment, context.settings
    stream = settings.stream_tokens if worker_id == DECODE else None
    prompts = [context.prompt(fault, i, max_tokens=stream) for i in range(settings.in_flight)]
    before = deployment.metric(worker_id, started) or 0.0
    notes: list[str] = []
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(context.send, p) for p in prompts]
        reached = _wait_metric_above(context, worker_id, started, before, settings.bound_s)
        pending = sum(not f.done() for f in futures)
        kill_wall = time.time()
        fault_at = deployment.kill(worker_id)
        notes.append(
            f"killed {'after' if reached else 'without seeing'} its {started} move; "
            f"{pending}/{len(prompts)} requests in flight at the kill"
        )
        load = Load(context.prober(fault), settings.interval_s, first_index=len(prompts)).start()
        results = _collect(futures, settings.bound_s)
    deployment.restart(worker_id, after_wall=kill_wall)
    restarted_s = time.monotonic() - fault_at
    time.sleep(settings.after_s)
    results += load.stop(settings.bound_s)
    notes.append(f"{worker_id} restarted and registered {restarted_s:.1f} s after the kill")
    if worker_id == PREFILL:
        pd = _first_pd(context, fault, 1000, fault_at)
        notes.append(f"P/D path used again {pd:.1f} s after the kill" if pd else "P/D never back")
    return Observed(results, fault_at, notes)


def same_id_restart(context: Context) -> Observed:
    """SIGKILL the prefill worker, restart it under the same id: P/D requests must read its
    KV again (``fabric.prefill_worker`` set, no fallback), not recompute."""
    deployment, settings = context.deployment, context.settings
    warm = context.send(context.prompt("same_id_restart", 0))
    notes = [f"before: route {warm.fabric.get('prefill_worker') or 'recompute'}"]
    kill_wall = time.time()
    fault_at = deployment.kill(PREFILL)
    deployment.restart(PREFILL, after_wall=kill_wall)
    notes.append(f"restarted {time.monotonic() - fault_at:.1f} s after the kill")
    results = [context.send(context.prompt("same_id_restart", i)) for i in range(1, 1 + PD_CHECKS)]
    routes = [
        f"{r.fabric.get('prefill_worker') or 'recompute'}/{r.fabric.get('transferred_blocks')}"
        for r in results
    ]
    notes.append(f"after: prefill_worker/transferred_blocks {routes}")
    del settings
    return Observed([warm, *results], fault_at, notes, served_needs_pd=True)


def burst(context: Context) -> Observed:
    """``--burst`` requests at once: each served, or refused with 429/503 within 2 s."""
    settings = context.settings
    prompts = [context.prompt("burst", i) for i in range(settings.burst)]
    start = time.monotonic()
    results = concurrently(
        context.deployment.url, context.deployment.model, prompts, settings.bound_s
    )
    refused = [r for r in results if r.outcome is Outcome.FAILED_CLEARLY and r.status in (429, 503)]
    served = [r for r in results if r.outcome is Outcome.SERVED]
    other = [r for r in results if r not in refused and r not in served]
    slow = [r for r in refused if r.latency_s > REFUSAL_GOAL_S]
    notes = [
        f"{len(served)} served (slowest {max((r.latency_s for r in served), default=0):.2f} s)",
        f"{len(refused)} refused 429/503 (slowest refusal "
        f"{max((r.latency_s for r in refused), default=0):.2f} s; {len(slow)} over "
        f"{REFUSAL_GOAL_S:.0f} s)",
        f"{len(other)} otherwise answered"
        + (f", e.g. {other[0].status} {other[0].detail[:80]!r}" if other else ""),
        f"all answered in {time.monotonic() - start:.1f} s",
    ]
    return Observed(results, None, notes, own_recovery=True)


def _wait_metric_above(
    context: Context, worker_id: str, name: str, before: float, bound_s: float
) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        value = context.deployment.metric(worker_id, name)
        if value is not None and value > before:
            return True
        time.sleep(0.01)
    return False


def _collect(futures: list[Future[Result]], bound_s: float) -> list[Result]:
    return [f.result(timeout=bound_s + 5.0) for f in futures]


def _first_pd(context: Context, fault: str, first_index: int, fault_at: float) -> float | None:
    """Seconds from ``fault_at`` until a fresh request is served on the P/D path (bounded)."""
    deadline = time.monotonic() + context.settings.bound_s
    index = first_index
    while time.monotonic() < deadline:
        got = context.send(context.prompt(fault, index))
        if got.outcome is Outcome.SERVED and got.pd_route:
            return got.done_at - fault_at
        index += 1
        time.sleep(context.settings.interval_s)
    return None
