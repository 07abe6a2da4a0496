"""Discovery: where workers publish themselves and find each other (etcd, or in memory in tests).

``registry`` holds the protocol and the records; ``memory`` and ``etcd`` implement it;
``registration`` keeps a worker registered and a directory of its peers; ``etcd_server`` runs a
local etcd. Imports only ``fabric.errors`` from the rest of the fabric. ``etcd`` (gRPC) is not
imported here, so the in-memory registry works without the etcd client installed.
"""

from __future__ import annotations

from fabric.discovery.memory import InMemoryRegistry, ManualClock
from fabric.discovery.registration import (
    WorkerDirectory,
    WorkerEvent,
    WorkerEventKind,
    WorkerRegistration,
    watch_workers,
)
from fabric.discovery.registry import (
    DEFAULT_NAMESPACE,
    Lease,
    LeaseId,
    Registry,
    Role,
    Watch,
    WatchEvent,
    WatchEventKind,
    WorkerId,
    WorkerRecord,
    parse_worker_key,
    worker_key,
    workers_prefix,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "InMemoryRegistry",
    "Lease",
    "LeaseId",
    "ManualClock",
    "Registry",
    "Role",
    "Watch",
    "WatchEvent",
    "WatchEventKind",
    "WorkerDirectory",
    "WorkerEvent",
    "WorkerEventKind",
    "WorkerId",
    "WorkerRecord",
    "WorkerRegistration",
    "parse_worker_key",
    "watch_workers",
    "worker_key",
    "workers_prefix",
]
