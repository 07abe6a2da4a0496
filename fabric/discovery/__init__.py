"""Discovery: where workers publish themselves and find each other (etcd, or in memory in tests).

``registry`` holds the protocol and the key scheme, ``records`` the typed worker records and their
wire form; ``memory`` and ``etcd`` implement the protocol; ``registration`` keeps a worker
registered and a directory of its peers; ``etcd_auth`` reads the ``FABRIC_ETCD_*`` credentials every
``EtcdRegistry`` uses; ``etcd_server`` runs a local etcd (``etcd_certs`` makes TLS material for it);
``metrics`` counts the process's etcd errors (failed calls, retries, lost watches, re-granted
leases).
Imports only ``fabric.errors`` from the rest of the fabric. ``etcd`` (gRPC) is not imported here, so
the in-memory registry works without the etcd client installed.
"""

from __future__ import annotations

from fabric.discovery.memory import InMemoryRegistry, ManualClock
from fabric.discovery.records import (
    Endpoints,
    EngineKind,
    FabricLayout,
    VllmLayout,
    WorkerLayout,
    WorkerRecord,
)
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
    parse_worker_key,
    worker_key,
    workers_prefix,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "Endpoints",
    "EngineKind",
    "FabricLayout",
    "InMemoryRegistry",
    "Lease",
    "LeaseId",
    "ManualClock",
    "Registry",
    "Role",
    "VllmLayout",
    "Watch",
    "WatchEvent",
    "WatchEventKind",
    "WorkerDirectory",
    "WorkerEvent",
    "WorkerEventKind",
    "WorkerId",
    "WorkerLayout",
    "WorkerRecord",
    "WorkerRegistration",
    "parse_worker_key",
    "watch_workers",
    "worker_key",
    "workers_prefix",
]
