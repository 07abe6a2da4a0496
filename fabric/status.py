"""``fabric status``: the cluster in a terminal table, from etcd or from a frontend.

Two sources, one table:

* etcd (default): every record under the namespace's workers prefix (prefill, decode and
  aggregated workers, whatever registers there), and each one's Prometheus endpoint, scraped
  concurrently (``dashboard_cluster.scrape_workers``, bounded per worker); node caches below
  the table (``dashboard_cluster.node_cache_json``: from their own metrics, used / capacity
  blocks, hit rate, live pins and reservations, leases reclaimed; the workers of their node
  and the blocks those stored and loaded there).
  Requests in flight are a frontend's view, so this source leaves them out.
* ``--frontend URL``: that frontend's ``/v1/fabric/cluster`` (the dashboard's JSON; its API key
  from ``--api-key-file`` or ``FABRIC_API_KEY_FILE``), which adds in-flight counts, the
  frontend's requests, latencies and routes.

Rows are the dashboard's worker figures (``dashboard_cluster.worker_json``): role, state, load,
requests, KV read, and per tier used / capacity blocks with the hit rate. A worker whose metrics
do not answer is a row in state ``unreachable`` (the exit status stays 0: the table is the
answer); an etcd or frontend that cannot be read is a ``FabricError`` naming it (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import DEFAULT_NAMESPACE, Role, workers_prefix
from fabric.errors import FabricError
from fabric.frontend.api_key import ENV_API_KEY_FILE, ApiKey
from fabric.frontend.dashboard import CLUSTER_PATH
from fabric.frontend.dashboard_cluster import (
    Json,
    node_cache_json,
    scrape_workers,
    worker_json,
)

TIMEOUT_S = 5.0
_COLUMNS = (
    "WORKER",
    "ROLE",
    "STATE",
    "IN FLIGHT",
    "ACTIVE/WAIT",
    "REQUESTS",
    "KV READ",
    "TIERS (used/capacity blocks, hit rate)",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--etcd",
        default="http://127.0.0.1:2379",
        help="etcd endpoint(s) where workers register, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="discovery namespace (%(default)s)"
    )
    parser.add_argument(
        "--frontend",
        metavar="URL",
        help="read the cluster from this frontend's /v1/fabric/cluster instead of etcd "
        "(adds in-flight counts, latencies and routes), e.g. http://127.0.0.1:8000",
    )
    parser.add_argument(
        "--api-key-file",
        help="the frontend's API key, for --frontend (default: $FABRIC_API_KEY_FILE)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the cluster as JSON instead of a table"
    )


def run(args: argparse.Namespace) -> int:
    if args.frontend:
        key_file = args.api_key_file
        key = ApiKey.load(key_file, "--api-key-file") if key_file else None
        cluster = from_frontend(args.frontend, key or ApiKey.from_env(ENV_API_KEY_FILE))
    else:
        cluster = from_etcd(args.etcd, args.namespace)
    print(json.dumps(cluster, indent=2) if args.json else render(cluster))
    return 0


def from_etcd(etcd: str, namespace: str) -> Json:
    """The records under ``namespace`` and their workers' metrics, as the dashboard's JSON."""
    from fabric.discovery.etcd import EtcdRegistry  # gRPC: only when reading etcd

    registry = EtcdRegistry(etcd, timeout_s=TIMEOUT_S)
    try:
        values = registry.get_prefix(workers_prefix(namespace))
    finally:
        registry.close()
    every = sorted(
        (WorkerRecord.from_bytes(value, key=key) for key, value in values.items()),
        key=lambda r: (r.role.value, r.worker_id),
    )
    records = [record for record in every if record.role is not Role.NODE_CACHE]
    caches = [record for record in every if record.role is Role.NODE_CACHE]
    scrapes = asyncio.run(scrape_workers([*records, *caches]))
    scraped = list(zip(records, scrapes[: len(records)], strict=True))
    return {
        "source": f"etcd {etcd}, namespace {namespace}",
        "workers": [worker_json(record, scrape) for record, scrape in scraped],
        "node_caches": [
            node_cache_json(record, scrape, scraped)
            for record, scrape in zip(caches, scrapes[len(records) :], strict=True)
        ],
    }


def from_frontend(url: str, key: ApiKey | None) -> Json:
    """The frontend's ``/v1/fabric/cluster``."""
    request = urllib.request.Request(url.rstrip("/") + CLUSTER_PATH)
    if key is not None:
        request.add_header("Authorization", key.authorization())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            cluster: Json = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        hint = " (give --api-key-file)" if exc.code == 401 else ""
        raise FabricError(f"{request.full_url}: HTTP {exc.code}{hint}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FabricError(f"{request.full_url}: cannot read the cluster ({exc})") from exc
    cluster["source"] = f"frontend {url}"
    return cluster


def render(cluster: Json) -> str:
    """The cluster as a text table (and the frontend's figures when it has them)."""
    workers: list[Json] = cluster["workers"]
    lines = [f"{cluster['source']}: {len(workers)} worker(s)"]
    front = cluster.get("frontend")
    if front is not None:
        routes = ", ".join(f"{kind} {_count(n)}" for kind, n in front["routes"].items())
        lines.append(
            f"frontend: {_count(front['requests'])} requests, {_count(front['in_flight'])} in "
            f"flight, {_count(front['queued'])} queued, TTFT {_ms(front['ttft_ms'])}, ITL "
            f"{_ms(front['itl_ms'])}, KV transfer {_ms(front['kv_transfer_ms'])}; routes: {routes}"
        )
    rows = [_COLUMNS, *(_row(worker) for worker in workers)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    for cache in cluster.get("node_caches", []):
        lines.append(
            f"node cache {cache['id']} on {cache['node'] or '?'} ({cache['state']}): "
            f"{_count(cache.get('used'))}/{_count(cache['capacity'])} blocks, "
            f"{_percent(cache.get('hit_rate'))} hit, {_count(cache.get('live_pins'))} pins, "
            f"{_count(cache.get('live_reservations'))} reservations, "
            f"{_count(cache.get('expired_leases'))} leases reclaimed; its node's workers "
            f"({', '.join(cache['workers']) or 'none'}) stored "
            f"{_count(cache['stored_blocks'])} and loaded {_count(cache['loaded_blocks'])} blocks"
        )
    return "\n".join(lines)


def _row(worker: Json) -> Sequence[str]:
    tiers = [
        f"{t['tier']} {_count(t['used'])}/{_count(t['capacity'])} {_percent(t['hit_rate'])}"
        for t in worker["tiers"]
    ]
    shared = worker.get("shared")
    if shared:
        tiers.append(f"{shared['tier']} {_count(shared['blocks'])} {_percent(shared['hit_rate'])}")
    active = worker.get("active")
    return (
        worker["id"],
        worker["role"],
        worker["state"],
        _count(worker.get("in_flight")),
        "-" if active is None else f"{_count(active)}/{_count(worker.get('waiting'))}",
        _count(worker.get("requests")),
        _bytes(worker.get("transferred_bytes")),
        "  ".join(tiers) or (worker.get("error") or "-"),
    )


def _count(value: Any) -> str:
    return "-" if value is None else f"{round(value):,}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{value:.0f} B" if i == 0 else f"{value:.1f} {units[i]}"
