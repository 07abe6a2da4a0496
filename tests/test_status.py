"""``fabric status``'s table and its errors (over a real deployment: ``e2e/test_cluster_page``).

Rows come from ``dashboard_cluster.worker_json`` over real scrapes (text exposition parsed by
``Samples``); a worker whose metrics did not answer is a row in state ``unreachable`` naming
why; a frontend that refuses the key or does not answer is a ``FabricError`` naming its URL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.frontend.dashboard_cluster import Samples, WorkerScrape, worker_json
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
