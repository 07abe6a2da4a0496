"""``NodeCacheConfig``: what one node KV cache serves, and the names and hashes derived from it.

The pool's own settings are a ``KvbmConfig`` (block size, layout kind, eviction policy, salt, the
host tier's size as ``cpu_cache_gb`` / ``cpu_cache_blocks``, the event endpoint), read from the
same ``FABRIC_*`` / ``DYN_KVBM_*`` names the workers read, so a node cache started in a
deployment's environment has the workers' block size, salt and therefore compat hash.

Invariants: a config is valid once built (a positive block count, a positive lease, a segment
name POSIX accepts); ``compat_hash`` is the hash seed ``build_kvbm`` gives a worker of the same
settings and geometry, so workers and the node cache agree on it without talking.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from fabric.discovery.registry import DEFAULT_NAMESPACE
from fabric.errors import ConfigError
from fabric.kvbm import KvbmConfig, KvGeometry, LayoutSpec, Tier, seed_for_salt
from fabric.kvbm.build import compat_salt

DEFAULT_LEASE_S = 5.0
DEFAULT_ENDPOINT = "tcp://127.0.0.1:0"
_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_SEGMENT = 200  # NAME_MAX is 255; leave room for the leading '/'


def segment_name(namespace: str, node: str) -> str:
    """The POSIX shared-memory name of the node cache of ``node`` in ``namespace``."""
    raw = f"kvfabric-{namespace}-{node}-node-cache"
    return _SEGMENT_CHARS.sub("_", raw)[:_MAX_SEGMENT]


@dataclass(frozen=True, slots=True)
class NodeCacheConfig:
    """Settings of one node cache process.

    Attributes:
        kvbm: the pool's settings; its host tier size is the node cache's size.
        geometry: the model's KV geometry (layers, KV heads, head size, dtype, K/V split).
        namespace: the deployment's discovery namespace (part of the segment name).
        node: this host's name (part of the segment name).
        endpoint: where the signal server binds (port 0: a free one).
        lease_s: how long a reservation or a pin lives unless renewed.
        admit_after: a block is stored once its hash was seen this many times (1: always).
        disk_dir: the node's own disk tier below the pool (``fabric.node.disk``: kvbm's G4
            block files), written through at commit and read on a pool miss; None: no disk.
        disk_blocks / disk_gb: how many blocks (or GiB of them) the disk tier keeps (LRU);
            one is needed with ``disk_dir``; blocks win when both are given.
        nixl: register the segment with a NIXL agent so other hosts can read it
            (``fabric.node.nixl``).
    """

    kvbm: KvbmConfig
    geometry: KvGeometry
    namespace: str = DEFAULT_NAMESPACE
    node: str = field(default_factory=socket.gethostname)
    endpoint: str = DEFAULT_ENDPOINT
    lease_s: float = DEFAULT_LEASE_S
    admit_after: int = 1
    disk_dir: Path | None = None
    disk_blocks: int = 0
    disk_gb: float = 0.0
    nixl: bool = False

    def __post_init__(self) -> None:
        if self.disk_dir is not None and self.num_disk_blocks <= 0:
            raise ConfigError(
                f"--disk-dir {self.disk_dir} needs a size: give --disk-blocks or --disk-gb"
            )
        if not self.lease_s > 0:
            raise ConfigError(f"lease_s must be positive, got {self.lease_s}")
        if self.admit_after < 1:
            raise ConfigError(f"admit_after must be at least 1, got {self.admit_after}")
        if not self.namespace or not self.node:
            raise ConfigError("namespace and node must not be empty (they name the segment)")
        if self.num_blocks <= 0:
            raise ConfigError(
                "the node cache has no blocks: give --blocks or --shm-gb (FABRIC_CPU_CACHE_BLOCKS "
                f"/ FABRIC_CPU_CACHE_GB); one block is {self.block_bytes} bytes"
            )

    @property
    def block_bytes(self) -> int:
        return self.layout_for(1).block_bytes

    @property
    def num_blocks(self) -> int:
        return self.kvbm.tier_blocks(Tier.HOST, self.block_bytes)

    @property
    def num_disk_blocks(self) -> int:
        if self.disk_blocks > 0:
            return self.disk_blocks
        return int(self.disk_gb * 2**30) // self.block_bytes

    @property
    def segment(self) -> str:
        return segment_name(self.namespace, self.node)

    @property
    def layout(self) -> LayoutSpec:
        """The layout of the shared segment's blocks."""
        return self.layout_for(self.num_blocks)

    @property
    def compat_hash(self) -> int:
        """The hash seed of a worker with these settings and geometry (``build_kvbm``'s)."""
        return seed_for_salt(compat_salt(self.kvbm, self.geometry))

    def layout_for(self, num_blocks: int) -> LayoutSpec:
        return self.geometry.layout(self.kvbm.layout, num_blocks, self.kvbm.block_size)
