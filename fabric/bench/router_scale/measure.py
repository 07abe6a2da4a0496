"""The measured process of ``router-scale``: the frontend's index, subscribers and router.

Runs ``measure`` in a child process of its own (a fresh heap: its resident memory is what the
frontend's structures cost). Holds a ``Fleet`` (its ``KvPrefixIndex``; the fleet is never
started) and a ``Router`` over it, and one real ``KvEventSubscriber`` per simulated worker (all
followed by the subscribers' one thread), subscribed over ZeroMQ TCP on 127.0.0.1 to the
simulated workers' PUBs (``sim_workers``), decoding with the real wire codec. Per stage:

* **ingest**: from the ``stage`` command until every subscriber applied every batch of the stage
  (the simulated workers' send time included): blocks named by the stage's events per second;
* **check**: each worker's indexed block count must equal the simulation's (a lost batch would
  have cleared the worker: a ``FabricError`` then, not a figure);
* **memory**: resident set growth since the subscribers were synced (before any block), over the
  index's (worker, block) pairs, after ``gc.collect()``: everything the frontend process grew by,
  allocator slack included;
* **routing**: ``Router.choose`` (the decision ``submit`` makes: pins, serving worker by load then
  prefix, KV source by longest device/host prefix; prompt hashing included) over every simulated
  worker as an aggregated worker with random in-flight loads 0-3, each routed prompt
  ``repeats`` times, ingest idle. A route is right when its KV provider (the source, or the
  serving worker itself for a local route) holds the prompt's longest prefix.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from fabric.bench.router_scale.sim_workers import StageInfo
from fabric.bench.router_scale.workload import BLOCK_SIZE, COMPAT, RoutedPrompt
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.frontend.fleet import Fleet, FleetView
from fabric.frontend.kv_subscriber import KvEventSubscriber
from fabric.frontend.roster import Roster
from fabric.frontend.router import Router
from fabric.kvbm.core import extension
from fabric.kvbm.core.hashing import sequence_hash_chunks

logger = logging.getLogger(__name__)

STALL_S = 60.0
"""Longest wait for subscribers that make no progress before the run fails."""
PROBE_S = 30.0


def measure(workers: Connection, parent: Connection, repeats: int) -> None:
    """The child process's body: rows (or an error) to ``parent``."""
    try:
        parent.send(("rows", _measure(workers, repeats)))
    except Exception as exc:  # reported by the parent, with what to do
        logger.exception("router-scale measurement failed")
        parent.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        workers.send(("stop",))


def _measure(workers: Connection, repeats: int) -> dict[str, Any]:
    _, worker_ids, endpoints, stages = workers.recv()
    _say(f"{len(worker_ids)} simulated workers ready")
    fleet = Fleet(InMemoryRegistry(), model_name="router-scale", identity="router-scale")
    router = Router(fleet)
    # As a frontend's first route does: load the native hashing when the set-up built it.
    hash_native = extension.native() is not None
    subscribers = [
        KvEventSubscriber(worker_id, fleet.index, endpoint=endpoint, replay_endpoint=None).start()
        for worker_id, endpoint in zip(worker_ids, endpoints, strict=True)
    ]
    try:
        _sync(workers, subscribers)
        _say(f"{len(subscribers)} subscribers synced")
        gc.collect()
        baseline = _rss_bytes()
        rows: list[dict[str, Any]] = []
        hashing: dict[int, float] = {}
        hashing_python: dict[int, float] = {}
        checks = {"routes": 0, "longest_prefix_picked": 0}
        done = [s.num_batches for s in subscribers]
        for i, stage in enumerate(stages):
            ingest = _ingest(workers, i, stage, subscribers, done)
            _check(fleet, worker_ids, stage)
            _say(f"stage {i}: {stage.num_event_blocks} event blocks at {ingest:.0f}/s")
            gc.collect()
            cached = fleet.index.num_cached_blocks
            bytes_per_block = (_rss_bytes() - baseline) / cached
            view = _view(fleet, worker_ids, endpoints, random.Random(i))
            for num_tokens, prompts in stage.prompts.items():
                times, right = _route(router, view, prompts, repeats)
                checks["routes"] += len(times)
                checks["longest_prefix_picked"] += right
                hashing[num_tokens] = _hash_ms(prompts)
                hashing_python[num_tokens] = _python_hash_ms(prompts)
                rows.append(
                    {
                        "workers": len(worker_ids),
                        "cached_blocks": cached,
                        "prompt_tokens": num_tokens,
                        "ingest_blocks_per_s": round(ingest),
                        "bytes_per_block": round(bytes_per_block, 1),
                        "route_ms_p50": round(_percentile(times, 50), 4),
                        "route_ms_p99": round(_percentile(times, 99), 4),
                    }
                )
        return {
            "rows": rows,
            "hash_ms_p50": hashing,
            "hash_ms_p50_python": hashing_python,
            "hash_native": hash_native,
            "checks": checks,
            "num_hashes": fleet.index.num_hashes,
        }
    finally:
        for subscriber in subscribers:
            subscriber.close()
        router.close()


def _say(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"router-scale: {message}", file=sys.stderr, flush=True)


def _sync(workers: Connection, subscribers: list[KvEventSubscriber]) -> None:
    """Probe until every subscriber has batch 0 (its subscription reached its PUB)."""
    deadline = time.monotonic() + PROBE_S
    while any(s.num_batches == 0 for s in subscribers):
        if time.monotonic() > deadline:
            missing = sum(s.num_batches == 0 for s in subscribers)
            raise FabricError(f"{missing} subscribers got no probe in {PROBE_S:.0f} s")
        workers.send(("probe",))
        workers.recv()
        time.sleep(0.05)


def _ingest(
    workers: Connection,
    stage_index: int,
    stage: StageInfo,
    subscribers: list[KvEventSubscriber],
    done: list[int],
) -> float:
    """Stream one stage; blocks per second until every subscriber applied it (``done`` moves)."""
    start = time.perf_counter()
    workers.send(("stage", stage_index))
    end = start
    while True:
        message = workers.recv()
        if message[0] == "done":
            break
        r = message[1]
        targets = [done[w] + min(r + 1, n) for w, n in enumerate(stage.num_payloads)]
        _wait_applied(subscribers, targets)
        end = time.perf_counter()
        workers.send(("ack", r))
    for w, n in enumerate(stage.num_payloads):
        done[w] += n
    return stage.num_event_blocks / (end - start)


def _wait_applied(subscribers: list[KvEventSubscriber], targets: list[int]) -> None:
    """Until each subscriber applied its target; fails after ``STALL_S`` with no progress."""
    for subscriber, target in zip(subscribers, targets, strict=True):
        applied = subscriber.num_batches
        last_progress = time.monotonic()
        while applied < target:
            time.sleep(0.0005)  # a cheap check: only this subscriber's count
            if subscriber.num_batches != applied:
                applied, last_progress = subscriber.num_batches, time.monotonic()
            elif time.monotonic() - last_progress > STALL_S:
                raise FabricError(
                    f"{subscriber.worker_id} applied {applied} of {target} batches and "
                    f"nothing moved for {STALL_S:.0f} s"
                )


def _check(fleet: Fleet, worker_ids: list[str], stage: StageInfo) -> None:
    for worker_id, expected in zip(worker_ids, stage.expected_blocks, strict=True):
        held = fleet.index.num_blocks(worker_id)
        if held != expected:
            raise FabricError(
                f"the index holds {held} blocks of {worker_id}, the simulation {expected}: "
                "events were lost (see the subscriber's warnings)"
            )


def _view(
    fleet: Fleet, worker_ids: list[str], endpoints: list[str], rng: random.Random
) -> FleetView:
    records = {
        worker_id: WorkerRecord(
            worker_id,
            Role.AGGREGATED,
            Endpoints(events=endpoint),
            None,
            FabricLayout(block_size=BLOCK_SIZE),
            COMPAT,
            0.0,
        )
        for worker_id, endpoint in zip(worker_ids, endpoints, strict=True)
    }
    load = {worker_id: rng.randrange(4) for worker_id in worker_ids}
    return FleetView(Roster.of(list(records.values()), load), load, fleet.index)


def _route(
    router: Router, view: FleetView, prompts: list[RoutedPrompt], repeats: int
) -> tuple[list[float], int]:
    """Milliseconds per decision, and how many found the prompt's holder."""
    times: list[float] = []
    right = 0
    for _ in range(repeats):
        for prompt in prompts:
            start = time.perf_counter()
            route = router.choose(view, prompt.token_ids)
            times.append((time.perf_counter() - start) * 1000)
            provider = route.source or route.serving
            right += (provider.worker_id, route.source_blocks) == (
                prompt.holder,
                prompt.holder_blocks,
            )
    return times, right


def _hash_ms(prompts: list[RoutedPrompt]) -> float:
    """Median milliseconds of hashing a whole prompt the router's way (``sequence_hash_chunks``
    read to the end: part of every full-hit decision)."""
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        for _ in sequence_hash_chunks(prompt.token_ids, BLOCK_SIZE, seed=COMPAT):
            pass
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 4)


def _python_hash_ms(prompts: list[RoutedPrompt]) -> float:
    """``_hash_ms`` with the native hashing switched off (``FABRIC_NATIVE_KERNELS=0``): the
    Python path, for the comparison."""
    saved = os.environ.get(extension.ENV_SWITCH)
    os.environ[extension.ENV_SWITCH] = "0"
    try:
        return _hash_ms(prompts)
    finally:
        if saved is None:
            del os.environ[extension.ENV_SWITCH]
        else:
            os.environ[extension.ENV_SWITCH] = saved


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
