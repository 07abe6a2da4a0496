"""A worker's /health/live and /health/ready (``fabric.worker.health``) on its metrics endpoint.

Over real HTTP on 127.0.0.1: the answers follow the state they read (scheduler alive, record
registered), every other path is still the Prometheus registry; and a real ``build_worker``
runtime (tiny model, in-memory registry, loopback agent) serves them on the port
``--metrics-port`` / ``FABRIC_METRICS_PORT`` names, ready once registered.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registry import Role
from fabric.supervise import free_port
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.health import LIVE_PATH, READY_PATH, WorkerHealth
from fabric.worker.metrics import MetricsServer
from fabric.worker.runtime import build_worker


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def base(server: MetricsServer) -> str:
    return server.url.removesuffix("/metrics")


@pytest.fixture
def state() -> dict[str, bool]:
    return {"alive": True, "registered": True}


@pytest.fixture
def server(state: dict[str, bool]) -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("probe_test_total", "A metric that must still be served.", registry=registry).inc()
    health = WorkerHealth(lambda: state["alive"])
    server = MetricsServer(registry, health=health)
    health.registered = lambda: state["registered"]
    yield server
    server.close()


def test_ready_and_live_follow_the_worker_state(
    server: MetricsServer, state: dict[str, bool]
) -> None:
    assert get(base(server) + LIVE_PATH) == (200, '{"live": true, "ready": true}\n')
    assert get(base(server) + READY_PATH)[0] == 200

    state["registered"] = False  # registration lost, or shutdown began
    assert get(base(server) + LIVE_PATH)[0] == 200
    status, body = get(base(server) + READY_PATH)
    assert (status, json.loads(body)) == (503, {"live": True, "ready": False})

    state.update(alive=False, registered=True)  # the scheduler thread died
    assert get(base(server) + LIVE_PATH)[0] == 503
    assert get(base(server) + READY_PATH)[0] == 503


def test_not_ready_before_registration_started() -> None:
    health = WorkerHealth(lambda: True)
    assert (health.live, health.ready) == (True, False)
    health.registered = lambda: True
    assert health.ready


def test_metrics_are_still_served_beside_health(server: MetricsServer) -> None:
    status, text = get(server.url)
    assert status == 200
    assert "probe_test_total 1.0" in text


def test_a_worker_serves_health_on_its_configured_metrics_port(tiny_dir: Path) -> None:
    port = free_port()
    config = load_config(
        model=str(tiny_dir),
        worker_id="health-0",
        namespace="health",
        device_blocks=16,
        metrics_port=port,
    )
    registry, loopback = InMemoryRegistry(), LoopbackRegistry()
    try:
        with build_worker(
            Role.DECODE,
            config,
            registry=registry,
            make_agent=lambda name: LoopbackAgent(name, loopback),
        ) as worker:
            url = f"http://127.0.0.1:{port}"
            assert worker.record.endpoints.metrics == f"{url}/metrics"
            assert get(url + READY_PATH) == (200, '{"live": true, "ready": true}\n')
            assert get(url + LIVE_PATH)[0] == 200
            assert 'fabric_worker_info{model="tiny",role="decode"' in get(url + "/metrics")[1]
    finally:
        registry.close()
