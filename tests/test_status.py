"""``fabric status``'s table and its errors (over a real deployment: ``e2e/test_cluster_page``).

Rows come from ``dashboard_cluster.worker_json`` over real scrapes (text exposition parsed by
``Samples``); a worker whose metrics did not answer is a row in state ``unreachable`` naming
why; a node cache's line shows its own occupancy and hit rate from its metrics; a frontend
that refuses the key or does not answer is a ``FabricError`` naming its URL.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.frontend.dashboard_cluster import Samples, WorkerScrape, node_cache_json, worker_json
from fabric.status import from_frontend, render

METRICS = """
fabric_kvbm_blocks_capacity{tier="G1"} 256
fabric_kvbm_blocks_in_use{tier="G1"} 2
fabric_kvbm_blocks_cached{tier="G1"} 7
fabric_kvbm_hits_total{tier="G1"} 3
fabric_kvbm_misses_total{tier="G1"} 1
fabric_worker_requests_total{kind="generate"} 5
fabric_worker_active_requests 1
fabric_worker_waiting_requests 2
"""


def record(worker_id: str, role: Role) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role=role,
        endpoints=Endpoints(metrics=f"http://127.0.0.1:9/{worker_id}"),
        agent_name=None,
        layout=FabricLayout(model="tiny", block_size=16),
        compat_hash=1,
        started_at=time.time(),
    )


def test_the_table_shows_each_worker_and_why_one_is_missing() -> None:
    up = worker_json(
        record("decode-0", Role.DECODE), WorkerScrape(0.0, Samples.parse(METRICS), None)
    )
    down = worker_json(
        record("prefill-0", Role.PREFILL), WorkerScrape(0.0, None, "connection refused")
    )
    table = render({"source": "etcd X, namespace N", "workers": [up, down]})
    lines = table.splitlines()
    assert lines[0] == "etcd X, namespace N: 2 worker(s)"
    assert lines[1].split()[:3] == ["WORKER", "ROLE", "STATE"]
    assert lines[2].split() == [
        "decode-0",
        "decode",
        "up",
        "-",
        "1/2",
        "5",
        "-",
        "G1",
        "9/256",
        "75.0%",
    ]
    assert lines[3].split()[:3] == ["prefill-0", "prefill", "unreachable"]
    assert lines[3].endswith("connection refused")


def test_a_node_cache_line_shows_its_own_occupancy_and_hit_rate() -> None:
    text = """
fabric_node_cache_blocks_capacity 64
fabric_node_cache_blocks_in_use 2
fabric_node_cache_blocks_cached 10
fabric_node_cache_hits_total 6
fabric_node_cache_misses_total 2
fabric_node_cache_live_pins 1
fabric_node_cache_live_reservations 0
fabric_node_cache_expired_pins_total 1
fabric_node_cache_expired_reservations_total 2
"""
    cache = dataclasses.replace(record("node-cache-a", Role.NODE_CACHE), node="a")
    worker = dataclasses.replace(record("decode-0", Role.DECODE), node="a")
    scraped = [(worker, WorkerScrape(0.0, Samples.parse(METRICS), None))]
    up = node_cache_json(cache, WorkerScrape(0.0, Samples.parse(text), None), scraped)
    down = node_cache_json(cache, WorkerScrape(0.0, None, "connection refused"), scraped)
    lines = render({"source": "s", "workers": [], "node_caches": [up, down]}).splitlines()
    assert lines[-2].startswith(
        "node cache node-cache-a on a (up): 12/64 blocks, 75.0% hit, 1 pins, 0 reservations, "
        "3 leases reclaimed; its node's workers (decode-0)"
    )
    assert lines[-1].startswith("node cache node-cache-a on a (unreachable): -/- blocks, - hit")


class _Refuse(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_frontend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_frontend_that_refuses_or_is_gone_is_an_error(refusing_frontend: str) -> None:
    with pytest.raises(FabricError, match=r"/v1/fabric/cluster: HTTP 401 \(give --api-key-file"):
        from_frontend(refusing_frontend, None)
    with pytest.raises(FabricError, match=r"http://127\.0\.0\.1:9/v1/fabric/cluster: cannot read"):
        from_frontend("http://127.0.0.1:9", None)
