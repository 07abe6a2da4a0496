"""What the vLLM suite reads back from etcd: the worker records the connectors registered.

Imported by bare name (pytest puts this directory on ``sys.path``); the name is unique across the
test tree.
"""

from __future__ import annotations

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import workers_prefix


def worker_records(etcd_endpoint: str) -> list[WorkerRecord]:
    """Every worker record registered at ``etcd_endpoint`` now."""
    registry = EtcdRegistry(etcd_endpoint, timeout_s=5.0)
    try:
        return [
            WorkerRecord.from_bytes(value, key=key)
            for key, value in registry.get_prefix(workers_prefix()).items()
        ]
    finally:
        registry.close()
