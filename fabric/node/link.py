"""``NodeLink``: a worker's node tier (kvbm's ``NodeTier``) over a ``NodeCacheClient`` that
attaches on first use and again after any failure.

Owns where the node cache is (``resolve``: a fixed endpoint, or this host's record in the worker
directory, ``endpoint_in``), the client while attached, and the pacing of attempts::

    DETACHED ──a store or load, retry time reached, endpoint known, attach ok──▶ ATTACHED
       ▲                                                                           │
       └── any FabricError (no answer, refused: the service restarted with a new ──┘
           segment and does not know this client, a lease ended): client closed,
           next attempt after a backoff (doubling from retry_s to max_retry_s), each
           attempt bounded by ATTACH_TIMEOUT_S

Invariants: kvbm's ``NodeTier`` ones: ``store`` and ``load`` never raise a ``FabricError`` (a
node tier that cannot serve is a miss, never a failed request) and report only what the node
confirmed (``NodeCacheClient``'s rule). A service that restarted is re-attached without a
restart of the worker: its first refusal detaches, the next attempt maps the new segment. One
WARNING per lost link, one INFO per attach. Owned by one thread, like its client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.errors import FabricError
from fabric.kvbm import LayoutSpec, SequenceHash, Storage
from fabric.node.client import NodeCacheClient, attach_node_cache

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
"""Bound on one request to the node cache (a local process: far more than it takes)."""
ATTACH_TIMEOUT_S = 0.5
"""Bound on one attempt to attach: each one the scheduler thread may wait for while no node
cache answers at a fixed endpoint (attempts are paced by the backoff)."""


NODE_CACHE_FROM_ETCD = "etcd"
"""The ``node_cache`` setting that finds this host's node cache in discovery."""


def fixed_endpoint(endpoint: str) -> Callable[[], str | None]:
    """A ``resolve`` for ``NodeLink``: always ``endpoint``."""

    def resolve() -> str | None:
        return endpoint

    return resolve


def endpoint_in(
    directory: WorkerDirectory, *, node: str, compat_hash: int
) -> Callable[[], str | None]:
    """A ``resolve`` for ``NodeLink``: the signal endpoint of the node cache registered for
    ``node`` with ``compat_hash`` in ``directory`` (None while there is none)."""

    def resolve() -> str | None:
        for record in directory.workers().values():
            if (
                record.role is Role.NODE_CACHE
                and record.node == node
                and record.compat_hash == compat_hash
                and not record.leaving
            ):
                return record.endpoints.signal
        return None

    return resolve


class NodeLink:
    """The node tier of one worker (see the module docstring).

    Args:
        resolve: the node cache's signal endpoint now, or None when none is known.
        identity: this worker's id (the node's leases are kept per identity).
        compat_hash: the worker's block manager's compat hash.
        layout: the layout of the worker's storages (compatibility facts compared on attach).
        timeout_s: bound on one request.
        retry_s / max_retry_s: the first and the longest wait between attempts to attach.
    """

    def __init__(
        self,
        resolve: Callable[[], str | None],
        *,
        identity: str,
        compat_hash: int,
        layout: LayoutSpec,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_s: float = 0.5,
        max_retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._identity = identity
        self._compat_hash = compat_hash
        self._layout = layout
        self._timeout_s = timeout_s
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        self._clock = clock
        self._client: NodeCacheClient | None = None
        self._next_attempt = 0.0
        self._backoff = retry_s
        self._closed = False
        self.num_attaches = 0

    @property
    def attached(self) -> bool:
        return self._client is not None

    def store(
        self,
        sequence_hashes: Sequence[SequenceHash],
        src: Storage,
        block_ids: Sequence[int],
        *,
        parent_hash: SequenceHash | None = None,
    ) -> int:
        client = self._attach()
        if client is None:
            return 0
        try:
            result = client.store(sequence_hashes, src, block_ids, parent_hash=parent_hash)
        except FabricError as exc:
            self._lost(f"a store failed: {exc}")
            return 0
        return result.num_stored

    def load(
        self,
        sequence_hashes: Sequence[SequenceHash],
        dst: Storage,
        allocate: Callable[[int], Sequence[int]],
    ) -> int:
        client = self._attach()
        if client is None:
            return 0
        try:
            return client.load_into(sequence_hashes, dst, allocate)
        except FabricError as exc:
            self._lost(f"a load failed: {exc}")
            return 0

    def prefix_length(self, sequence_hashes: Sequence[SequenceHash]) -> int:
        """How many leading blocks of ``sequence_hashes`` the node holds now: a lookup whose pin
        is released at once (0 when the node cannot serve). A planner's count for a process
        that loads elsewhere (vLLM's scheduler side): a later ``load`` may find fewer."""
        client = self._attach()
        if client is None or not sequence_hashes:
            return 0
        try:
            pinned = client.lookup(sequence_hashes)
            if pinned.lease_id is not None:
                client.release(pinned.lease_id)
        except FabricError as exc:
            self._lost(f"a lookup failed: {exc}")
            return 0
        return len(pinned.slot_ids)

    def close(self) -> None:
        """Detach (the node keeps every committed block). Idempotent."""
        self._closed = True
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- internals -------------------------------------------------------------------------------

    def _attach(self) -> NodeCacheClient | None:
        if self._client is not None or self._closed:
            return self._client
        now = self._clock()
        if now < self._next_attempt:
            return None
        endpoint = self._resolve()
        if endpoint is None:
            self._retry_later(now)
            return None
        try:
            self._client = attach_node_cache(
                endpoint,
                identity=self._identity,
                compat_hash=self._compat_hash,
                layout=self._layout,
                timeout_s=self._timeout_s,
                attach_timeout_s=min(ATTACH_TIMEOUT_S, self._timeout_s),
            )
        except FabricError as exc:
            if self._backoff == self._retry_s:  # the first failure of a streak
                logger.warning("node cache at %s: cannot attach (%s); retrying", endpoint, exc)
            self._retry_later(now)
            return None
        self._backoff = self._retry_s
        self.num_attaches += 1
        logger.info("node tier attached: node cache at %s", endpoint)
        return self._client

    def _lost(self, why: str) -> None:
        logger.warning("node tier lost (%s); served as a miss until it attaches again", why)
        if self._client is not None:
            self._client.close()
            self._client = None
        self._next_attempt = self._clock()  # a restarted service: try again at the next use

    def _retry_later(self, now: float) -> None:
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, self._max_retry_s)
