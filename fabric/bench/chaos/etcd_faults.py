"""Faults on discovery: etcd paused (SIGSTOP) and killed (SIGKILL, restarted on the same port
and data directory), and the decode worker's record deleted under its live lease.

Requests keep coming (one every ``interval_s``, each on its own thread) before, during and after
each fault; the deployment is healthy again when each returns.
"""

from __future__ import annotations

import time

from fabric.bench.chaos.context import Context, Observed
from fabric.bench.chaos.deployment import DECODE
from fabric.bench.chaos.outcomes import Load, Result

LEAD_S = 2.0
"""Requests sent before the fault."""
ETCD_DOWN_S = 2.0
"""How long a killed etcd stays down before it is started again."""
RECORD_POLL_S = 0.05


def etcd_pause(context: Context) -> Observed:
    """SIGSTOP etcd for ``--etcd-pause-s`` while requests keep coming, then SIGCONT."""
    deployment, settings = context.deployment, context.settings
    load = Load(context.prober("etcd_pause"), settings.interval_s).start()
    time.sleep(LEAD_S)
    fault_at = time.monotonic()
    deployment.etcd.pause()
    try:
        time.sleep(settings.etcd_pause_s)
    finally:
        deployment.etcd.resume()
    back = deployment.wait_registered(settings.bound_s)
    time.sleep(settings.after_s)
    results = load.stop(settings.bound_s)
    notes = [
        f"paused {settings.etcd_pause_s:g} s",
        _failed_during(results, fault_at, settings.etcd_pause_s),
        "records and fleet whole "
        + (f"{back:.1f} s after SIGCONT" if back is not None else "never"),
    ]
    return Observed(results, fault_at, notes)


def etcd_kill(context: Context) -> Observed:
    """SIGKILL etcd, start it again on the same port and data directory after a while."""
    deployment, settings = context.deployment, context.settings
    load = Load(context.prober("etcd_kill"), settings.interval_s).start()
    time.sleep(LEAD_S)
    fault_at = time.monotonic()
    deployment.etcd.kill()
    time.sleep(ETCD_DOWN_S)
    deployment.etcd.restart()
    up_s = time.monotonic() - fault_at
    back = deployment.wait_registered(settings.bound_s)
    time.sleep(settings.after_s)
    results = load.stop(settings.bound_s)
    notes = [
        f"etcd down {ETCD_DOWN_S:g} s, healthy again {up_s:.1f} s after the kill",
        _failed_during(results, fault_at, up_s),
        "records and fleet whole "
        + (f"{back:.1f} s after etcd was" if back is not None else "never"),
    ]
    return Observed(results, fault_at, notes)


def registration_deleted(context: Context) -> Observed:
    """Delete the decode worker's record; recovery: until the record is back in etcd."""
    deployment, settings = context.deployment, context.settings
    load = Load(context.prober("registration_deleted"), settings.interval_s).start()
    time.sleep(LEAD_S)
    key = deployment.record_key(DECODE)
    fault_at = time.monotonic()
    deleted = deployment.registry().delete(key)
    back_s = None
    while time.monotonic() - fault_at < settings.bound_s:
        if deployment.record(DECODE) is not None:
            back_s = time.monotonic() - fault_at
            break
        time.sleep(RECORD_POLL_S)
    time.sleep(settings.after_s)
    results = load.stop(settings.bound_s)
    notes = [
        f"deleted {key} ({'it existed' if deleted else 'it was not there'})",
        "record back "
        + (f"after {back_s:.2f} s" if back_s is not None else "never")
        + " (goal: one keepalive, ttl/3 = 1.7 s at the default 5 s TTL)",
        _failed_during(results, fault_at, back_s or settings.bound_s),
    ]
    return Observed(results, fault_at, notes, recovery_s=back_s, own_recovery=True)


def _failed_during(results: list[Result], fault_at: float, window_s: float) -> str:
    sent = [r for r in results if fault_at <= r.sent_at <= fault_at + window_s]
    failed = [r for r in sent if r.status != 200]
    slowest = max((r.latency_s for r in results), default=0.0)
    return (
        f"{len(failed)}/{len(sent)} requests sent during the fault not served; "
        f"{len(results)} sent in all, slowest answer {slowest:.2f} s"
    )
