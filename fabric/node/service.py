"""``build_node_cache``: a ``NodeCacheService`` wired from a ``NodeCacheConfig``.

The service is the node cache's running whole: the shared segment (kvbm's ``tier_storage`` for
the HOST tier with ``host_shared_name`` set: ``host_storage(..., shared_name=...)``), the pool
with the configured eviction policy and event sink (kvbm's ``build_pool``, ``publisher_for``),
the admission filter, the slot index readers probe (``fabric.node.index``), the optional disk
tier (``fabric.node.disk``) and NIXL registration (``fabric.node.nixl``), the ``NodeCache``
over them, and the ``SignalServer`` that serves it.

Invariants: the segment's memory is allocated when it is built (every page written once, after
checking that /dev/shm has room: a full tmpfs is a clear error at start, never a SIGBUS in a
client's copy later); the segment is created here and unlinked by ``close`` (or by a failed
build, which closes everything it built, in reverse order); ``close`` stops serving before it
unlinks, is idempotent, and leaves processes that still map the segment a valid mapping (the
kernel frees the memory when the last one unmaps).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable

from fabric.discovery.addresses import HostAddresses
from fabric.discovery.records import Endpoints, WorkerRecord
from fabric.discovery.registry import Role
from fabric.errors import StorageError
from fabric.kvbm import (
    EventSink,
    FrequencyFilter,
    SharedBlockStore,
    Storage,
    TensorStorage,
    Tier,
    ZmqEventPublisher,
    build_pool,
    layout_record,
    publisher_for,
    tier_storage,
)
from fabric.node.cache import Lease, NodeCache
from fabric.node.client import fault_in
from fabric.node.config import NodeCacheConfig
from fabric.node.disk import NodeDisk
from fabric.node.index import IndexWriter, segment_inode
from fabric.node.leases import LeaseTable
from fabric.node.nixl import NodeNixl
from fabric.signal.server import SignalServer

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


class NodeCacheService:
    """The node cache, its shared segment, its event sink and its signal server."""

    def __init__(
        self,
        cache: NodeCache,
        storage: Storage,
        events: EventSink,
        server: SignalServer,
        owner_fd: int,
        *,
        index: IndexWriter | None = None,
        disk: NodeDisk | None = None,
        nixl: NodeNixl | None = None,
    ) -> None:
        self.cache = cache
        self.index = index
        self.disk = disk
        self.nixl = nixl
        self.storage = storage
        self.events = events
        self.server = server
        self._owner_fd = owner_fd  # claim_segment's lock, released after the unlink
        self._closed = False

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def segment(self) -> str:
        return self.cache.geometry.segment

    def close(self) -> None:
        """Stop serving, unlink the segment, close the event sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        if self.index is not None:
            self.index.close()
        if self.disk is not None:  # its writer reads the segment: before the segment goes
            self.disk.close()
        if self.nixl is not None:
            self.nixl.close()
        self.storage.close()
        self.events.close()
        release_segment(self.segment, self._owner_fd)
        logger.info("node cache stopped; segment %s unlinked", self.segment)

    def __enter__(self) -> NodeCacheService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_room(num_bytes: int) -> None:
    """Refuse a segment larger than the free space of /dev/shm (writing past it is SIGBUS)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return  # no /dev/shm to ask: the segment's creation says what went wrong
    free = stat.f_bavail * stat.f_frsize
    if num_bytes > free:
        raise StorageError(
            f"the node cache needs {num_bytes / 2**30:.2f} GiB of shared memory, {SHM_DIR} has "
            f"{free / 2**30:.2f} GiB free: give fewer --blocks / a smaller --shm-gb, or a larger "
            f"{SHM_DIR}"
        )


def claim_segment(segment: str) -> int:
    """Become the one live node cache of ``segment``: an exclusive ``flock`` on
    ``/dev/shm/<segment>.owner``, held (the returned descriptor) for the service's life.

    The kernel drops the lock when its process dies, however it dies, so a segment whose owner
    file is not locked was left by a node cache killed before it could unlink it (SIGKILL,
    OOM): it is removed here, and the restarted cache starts empty (clients of the old one are
    told to attach again).

    Raises:
        StorageError: a live node cache holds the lock (same node name and namespace).
    """
    path = os.path.join(SHM_DIR, f"{segment}.owner")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(
            f"another node cache serves segment {segment} (it holds {path}): stop it, or give "
            "this one another --node or --namespace"
        ) from None
    stale = os.path.join(SHM_DIR, segment)
    if os.path.exists(stale):
        os.unlink(stale)
        logger.warning(
            "removed segment %s, left by a node cache that died without unlinking it", segment
        )
    return fd


def release_segment(segment: str, fd: int) -> None:
    """Give up ``claim_segment``'s lock (after the segment is unlinked) and remove its file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, f"{segment}.owner"))
    os.close(fd)


def node_record(
    service: NodeCacheService,
    config: NodeCacheConfig,
    *,
    model: str,
    metrics: str | None = None,
    addresses: HostAddresses | None = None,
) -> WorkerRecord:
    """The discovery record of ``service``: role ``NODE_CACHE``, id ``node-cache-<node>``, the
    host's name in ``node`` (workers of the host find it by that), its signal endpoint and KV
    event stream, its ``/metrics`` URL when it serves one (``metrics``: dashboards and
    ``fabric status`` scrape it), the segment's layout facts and the compat hash its blocks are
    keyed by. With ``addresses``, the event stream is given at the advertised host (the signal
    endpoint is published as configured: an ``ipc://`` path or a host the user chose)."""
    layout = config.layout
    events = service.events
    advertise = addresses.advertise if addresses is not None else str
    signal_endpoint = service.endpoint
    if addresses is not None and signal_endpoint.startswith("tcp://"):
        signal_endpoint = addresses.published(signal_endpoint)
    endpoints = (
        Endpoints(
            signal=signal_endpoint,
            metrics=metrics,
            events=advertise(events.endpoint),
            events_replay=advertise(events.replay_endpoint)
            if events.replay_endpoint is not None
            else None,
        )
        if isinstance(events, ZmqEventPublisher)
        else Endpoints(signal=signal_endpoint, metrics=metrics)
    )
    return WorkerRecord(
        worker_id=f"node-cache-{config.node}",
        role=Role.NODE_CACHE,
        endpoints=endpoints,
        agent_name=None if service.nixl is None else service.nixl.agent.name,
        layout=layout_record(layout, model=model),
        compat_hash=config.compat_hash,
        started_at=time.time(),
        node=config.node,
    )


def build_node_cache(
    config: NodeCacheConfig, *, clock: Callable[[], float] = time.monotonic
) -> NodeCacheService:
    """Create the segment, the pool and the server; serving starts before this returns.

    A segment left by a node cache that died is replaced (``claim_segment``).

    Raises:
        StorageError: another live node cache serves the segment, or it cannot be created.
        ConfigError: the endpoint cannot be bound.
    """
    segment = config.segment
    kvbm = config.kvbm.model_copy(update={"host_shared_name": segment})
    layout = config.layout
    events = publisher_for(kvbm)
    built: list[Storage | EventSink | IndexWriter | NodeDisk | NodeNixl] = [events]
    owner_fd: int | None = None
    try:
        owner_fd = claim_segment(segment)
        _check_room(layout.total_bytes)
        storage = tier_storage(kvbm, Tier.HOST, layout)
        built.append(storage)
        assert isinstance(storage, TensorStorage)  # the HOST tier's storage
        fault_in(storage, write=True)  # its memory is allocated now, not at a first store
        data_inode = segment_inode(segment)
        assert data_inode is not None  # created just above, under this service's claim
        index = IndexWriter(segment, layout.num_blocks, data_inode)
        built.append(index)
        disk = None
        if config.disk_dir is not None:
            store = SharedBlockStore(
                config.disk_dir,
                compat_hash=config.compat_hash,
                block_bytes=layout.block_bytes,
                capacity_blocks=config.num_disk_blocks,
            )
            disk = NodeDisk(store, storage, max_pending_blocks=max(1, layout.num_blocks // 4))
            built.append(disk)
        cache = NodeCache(
            build_pool(kvbm, Tier.NODE, layout.num_blocks, events),  # events: the node tier
            layout,
            segment=segment,
            compat_hash=config.compat_hash,
            admission=FrequencyFilter(config.admit_after),
            leases=LeaseTable[Lease](config.lease_s, clock),
            index=index,
            disk=disk,
        )
        nixl = None
        if config.nixl:
            nixl = NodeNixl(
                storage, node=config.node, compat_hash=config.compat_hash, busy=cache.busy
            )
            built.append(nixl)
        server = SignalServer(
            config.endpoint, cache.handle, compat_hash=config.compat_hash, name="node-cache"
        )
    except BaseException:
        for part in reversed(built):
            part.close()
        if owner_fd is not None:
            release_segment(segment, owner_fd)
        raise
    if disk is not None:
        logger.info("node cache disk tier: %r, written through at commit", disk.store)
    logger.info(
        "node cache: %d blocks of %d bytes (%.1f MiB) in shared segment %s, leases %.1f s, "
        "compat hash %#018x",
        layout.num_blocks,
        layout.block_bytes,
        layout.total_bytes / 2**20,
        segment,
        config.lease_s,
        config.compat_hash,
    )
    return NodeCacheService(
        cache, storage, events, server, owner_fd, index=index, disk=disk, nixl=nixl
    )
