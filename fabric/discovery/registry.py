"""The discovery contract: the ``Registry`` protocol, leases, watches, roles and worker keys.

Owns the verbs every registry implements (``memory.InMemoryRegistry`` for unit tests,
``etcd.EtcdRegistry`` in deployments), the key scheme worker records live under (the records
themselves are ``records.WorkerRecord``), and the retry pacing (``Backoff``) the implementations
share.

Invariants of every ``Registry``:

* Keys are ``str``, values ``bytes``. A key put under a lease disappears when that lease expires
  (no keepalive within its TTL) or is revoked; revoking is immediate.
* ``keepalive`` answers ``False`` when the lease no longer exists (expired or revoked): an expected
  outcome, so a value. Putting under such a lease raises ``DiscoveryError``.
* A failed call (server unreachable, deadline exceeded) raises ``DiscoveryError`` naming the
  endpoint and what to do; every call is bounded by the registry's timeout.
* ``watch_prefix`` delivers ``WatchEvent``s for one prefix, in revision order, on one thread per
  watch (the in-memory fake delivers synchronously, see its docstring). A ``DELETE`` carries the
  last value the watch saw for the key (lease expiry and revocation are ``DELETE``s too). With
  ``include_existing=True`` the keys present when the watch starts arrive first as ``PUT``s, so
  list + watch is one race-free step. A watch never misses a change silently: if its connection
  breaks it reconnects, re-lists the prefix and delivers the difference (``PUT`` for new or changed
  keys, ``DELETE`` for keys that vanished); ``Watch.connected`` is ``False`` in between.
  ``cancel`` stops delivery; no callback starts after ``cancel`` returns, unless ``cancel`` was
  called from inside that watch's callback.

Key scheme: ``/<namespace>/workers/<role>/<worker_id>`` (namespace default ``kv-fabric``). Node
caches register under the same scheme with role ``node-cache`` (readers that serve requests
skip that role).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NewType, Protocol

from fabric.errors import ConfigError

DEFAULT_NAMESPACE = "kv-fabric"

LeaseId = NewType("LeaseId", int)
WorkerId = NewType("WorkerId", str)


@dataclass(frozen=True)
class Lease:
    """A granted lease: keys put under it live as long as it is kept alive."""

    id: LeaseId
    ttl_s: float  # as granted (etcd rounds up to whole seconds and to its minimum TTL)


class WatchEventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix. ``value`` of a DELETE is the last value seen."""

    kind: WatchEventKind
    key: str
    value: bytes | None


WatchCallback = Callable[[WatchEvent], None]


class Watch(Protocol):
    """A live prefix watch."""

    @property
    def connected(self) -> bool:
        """False while the watch has lost its server and is re-establishing itself."""
        ...

    def cancel(self) -> None:
        """Stop delivery (idempotent; bounded)."""
        ...


class Registry(Protocol):
    """A small key-value registry with leases and prefix watches (etcd v3 semantics)."""

    def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    def delete(self, key: str) -> bool:
        """Delete one key; True when it existed."""
        ...

    def grant_lease(self, ttl_s: float) -> Lease: ...

    def keepalive(self, lease: Lease) -> bool:
        """Refresh the lease's TTL; False when the lease no longer exists."""
        ...

    def revoke(self, lease: Lease) -> None:
        """Revoke the lease and delete its keys at once (a lease already gone is not an error)."""
        ...

    def watch_prefix(
        self, prefix: str, callback: WatchCallback, *, include_existing: bool = False
    ) -> Watch: ...

    def close(self) -> None:
        """Cancel the watches and release the connections (leases are left to expire)."""
        ...


def diff_events(before: dict[str, bytes], after: dict[str, bytes]) -> list[WatchEvent]:
    """The events that turn a watcher's view ``before`` into ``after`` (deletes first, sorted)."""
    deleted = [
        WatchEvent(WatchEventKind.DELETE, key, value)
        for key, value in sorted(before.items())
        if key not in after
    ]
    changed = [
        WatchEvent(WatchEventKind.PUT, key, value)
        for key, value in sorted(after.items())
        if before.get(key) != value
    ]
    return deleted + changed


@dataclass
class Backoff:
    """Exponential retry delays with jitter: ``initial_s``, doubling, capped at ``max_s``."""

    initial_s: float = 0.1
    max_s: float = 2.0
    _next_s: float = field(init=False, default=0.0)

    def next_delay(self) -> float:
        base = self._next_s or self.initial_s
        self._next_s = min(base * 2.0, self.max_s)
        return base * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next_s = 0.0


class Role(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"
    FRONTEND = "frontend"
    NODE_CACHE = "node-cache"
    """A host's node KV cache (``fabric.node``): a KV tier, never a worker to route requests to."""


def check_segment(what: str, value: str) -> None:
    """Refuse (ConfigError) a key segment that is empty or contains '/'."""
    if not value or "/" in value:
        raise ConfigError(f"{what} {value!r} must be non-empty and contain no '/'")


def workers_prefix(namespace: str = DEFAULT_NAMESPACE, role: Role | None = None) -> str:
    """The prefix all worker records (of one role, when given) live under, ending in '/'."""
    check_segment("namespace", namespace)
    base = f"/{namespace}/workers/"
    return base if role is None else f"{base}{role.value}/"


def worker_key(namespace: str, role: Role, worker_id: str) -> str:
    check_segment("worker_id", worker_id)
    return f"{workers_prefix(namespace, role)}{worker_id}"


def parse_worker_key(key: str, namespace: str = DEFAULT_NAMESPACE) -> tuple[Role, WorkerId] | None:
    """``(role, worker_id)`` of a worker key, or None when ``key`` is not one."""
    rest = key.removeprefix(workers_prefix(namespace))
    if rest == key or rest.count("/") != 1:
        return None
    role_value, worker_id = rest.split("/")
    try:
        role = Role(role_value)
    except ValueError:
        return None
    return (role, WorkerId(worker_id)) if worker_id else None
