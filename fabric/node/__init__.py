"""The node KV cache: one host-memory tier in POSIX shared memory, shared by every process on a
host and outliving any of them (issue 13).

    config    NodeCacheConfig: the pool's KvbmConfig, the KV geometry, namespace and node (the
              segment's name), endpoint, lease time, admission; the compat hash workers share
    leases    LeaseTable: ids, owners and deadlines of reservations and pins
    cache     NodeCache: kvbm's BlockPool (its registry is the index, its eviction policy and
              events), the admission filter, the lease state machine, the signal handler
    service   build_node_cache -> NodeCacheService: segment + pool + NodeCache + SignalServer
    client    attach_node_cache -> NodeCacheClient: map the segment; store (reserve, one copy,
              commit) and load (a full hit through the slot index, no request; else lookup +
              pin, one copy, unpin)
    index     the slot index in shared memory (one writer, seqlocked readers)
    disk      NodeDisk: the node's disk tier (kvbm's G4 store), write-through, onboard on lookup
    nixl      NodeNixl: the segment registered with NIXL, its block set in etcd
    remote    RemoteNodeReader: a reader on another host (lookup + pin, NIXL READ, unpin)

``python -m fabric.node`` (``fabric serve node-cache``) runs the service. The protocol's
messages are ``fabric.signal.messages``' Node* types over the signal channel. Imports
``fabric.kvbm`` (its face and ``kvbm.build``), ``fabric.signal``, ``fabric.discovery`` (the
default namespace) and ``fabric.errors``; the ``__main__`` entry point also reads model presets.
"""

from __future__ import annotations

from fabric.node.client import NodeCacheClient, StoreResult, attach_node_cache
from fabric.node.config import NodeCacheConfig, segment_name
from fabric.node.service import NodeCacheService, build_node_cache

__all__ = [
    "NodeCacheClient",
    "NodeCacheConfig",
    "NodeCacheService",
    "StoreResult",
    "attach_node_cache",
    "build_node_cache",
    "segment_name",
]
