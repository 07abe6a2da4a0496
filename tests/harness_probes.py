"""What the test harnesses (``tests/e2e/e2e_harness.py``, ``tests/multihost/cluster_harness.py``,
``tests/worker/serving_harness.py``) and their tests read of a running deployment: bounded
polling, Prometheus scrapes and samples, the frontend's ``/health`` and the workers' etcd records.

Imported by bare name (``tests/`` is on ``sys.path``: the root conftest's directory); the name
is unique across the test tree. Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import workers_prefix

SCRAPE_S = 5.0


def wait_until(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy; False once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def scrape(url: str) -> str:
    """The Prometheus text at ``url``."""
    with urllib.request.urlopen(url, timeout=SCRAPE_S) as response:
        return str(response.read().decode())


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels``; ``default`` when absent (or fail)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    if default is None:
        raise AssertionError(f"{name}{labels or ''} not in the scrape")
    return default


def frontend_health(url: str, timeout_s: float) -> dict[str, Any] | None:
    """The frontend's ``/health`` body (200 or 503), or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except (OSError, ValueError):  # URLError is an OSError
        return None


def worker_records(registry: EtcdRegistry, namespace: str) -> dict[str, WorkerRecord]:
    """The worker records of ``namespace`` in etcd, by worker id."""
    return {
        record.worker_id: record
        for record in (
            WorkerRecord.from_bytes(value, key=key)
            for key, value in registry.get_prefix(workers_prefix(namespace)).items()
        )
    }


def launched_pids(output: str) -> list[int]:
    """The pids ``fabric launch`` printed for the processes it started (``started NAME (pid N)``):
    each runs in a process group of its own, so a check of launch's group does not cover them."""
    return [int(m) for m in re.findall(r"\] started \S+ \(pid (\d+)\)", output)]


def process_alive(pid: int) -> bool:
    """True while a process ``pid`` exists (a zombie counts: its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
