"""``NodeNixl``: the node cache's shared segment registered with a NIXL agent, so a process on
another host can READ committed blocks after a lookup + pin over the signal channel
(``fabric.node.remote``), and what such a reader needs, published in etcd.

What a remote reader needs is a ``RemoteBlockSet`` of the segment (kvbm's ``export_block_set``:
the agent's name and metadata, the layout, each buffer's base address, the compat hash; no
block ids: a pin names the slots). It travels as its versioned msgpack bytes under
``nixl_key(namespace, node)`` in etcd, beside the node cache's record, whose ``agent_name`` is
the same agent's: a reader uses the block set only while a live record names that agent (a
block set left by a killed instance names an agent no record names: agent names carry a random
suffix per instance).

Progress. NIXL's progress thread is off (``AgentConfig``): over TCP a READ completes only while
the exporting agent is polled (``fabric.pd.progress`` measured why). One thread owns the agent
after the build (agents are not thread-safe) and polls it every ``POLL_S`` while the cache has
a live lease (a pin is what a remote reader reads under), every ``IDLE_S`` otherwise.

Invariants: the segment is registered before the block set is exported and deregistered only
after the poller stopped; ``close`` stops the poller, deregisters, closes the agent, idempotent.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

from fabric.discovery.registry import Registry
from fabric.kvbm import TensorStorage
from fabric.kvbm.remote import RemoteBlockSet, export_block_set
from fabric.transfer.agent import AgentConfig
from fabric.transfer.nixl_agent import NixlAgent

logger = logging.getLogger(__name__)

POLL_S = 0.001
"""Between polls while a lease is live: well under one socket buffer's transfer time."""
IDLE_S = 0.02
"""Between checks for a live lease when there is none."""


def nixl_key(namespace: str, node: str) -> str:
    """The etcd key of the node cache's block set (beside, not under, the workers' records:
    directories parse everything under those as records)."""
    return f"/{namespace}/node-cache-nixl/{node}"


class NodeNixl:
    """The segment's NIXL registration, its block set and the agent's poller.

    Args:
        storage: the shared segment (the service's mapping).
        node: this host's name (part of the agent's name).
        compat_hash: the node cache's compat hash (carried by the block set).
        busy: whether a lease is live now (read without a lock; a stale answer costs one
            interval).
        config: the agent's settings.
    """

    def __init__(
        self,
        storage: TensorStorage,
        *,
        node: str,
        compat_hash: int,
        busy: Callable[[], bool],
        config: AgentConfig | None = None,
    ) -> None:
        self.agent = NixlAgent(f"node-cache-{node}-{secrets.token_hex(4)}", config)
        try:
            self._registration = self.agent.register(storage.buffers())
            self.block_set: RemoteBlockSet = export_block_set(storage, [], self.agent, compat_hash)
        except BaseException:
            self.agent.close()
            raise
        self._busy = busy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="node-nixl-progress", daemon=True)
        self._thread.start()
        self._closed = False
        logger.info("node cache segment registered with NIXL agent %s", self.agent.name)

    def publish(self, registry: Registry, namespace: str, node: str) -> str:
        """Put the block set in etcd (no lease: a stale one names a dead agent); its key."""
        key = nixl_key(namespace, node)
        registry.put(key, self.block_set.to_bytes())
        return key

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.agent.deregister(self._registration)
        self.agent.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self._busy():
                self.agent.notifications()  # NIXL's progress call; no notifications are used
                self._stop.wait(POLL_S)
            else:
                self._stop.wait(IDLE_S)
