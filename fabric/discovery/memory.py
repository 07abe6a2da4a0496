"""InMemoryRegistry: a process-local ``Registry`` with etcd's semantics, for unit tests.

Owns a key-value map, leases and watches behind one lock. Same contract as ``EtcdRegistry``
(see ``registry``), with two documented differences that make tests deterministic:

* **Delivery is synchronous.** A watch callback runs in the thread that made the change (the
  caller of ``put`` / ``delete`` / ``revoke``, or whoever expired the lease), after the state lock
  is released and before that call returns. Deliveries are serialised by a re-entrant lock, so
  events arrive in change order and a callback may call the registry; a callback must not wait
  for another thread that uses the registry. A watch is always ``connected``.
* **Time is pluggable.** With ``clock=None`` leases expire in real time: a sweeper thread
  (started at the first lease, stopped by ``close``) expires them every ``sweep_interval_s``.
  With an explicit ``clock`` (e.g. ``ManualClock``) there is no thread: expiry happens when a
  call observes the clock past a lease's deadline, or when the test calls ``expire_due()``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.discovery.registry import (
    Lease,
    LeaseId,
    WatchCallback,
    WatchEvent,
    WatchEventKind,
    diff_events,
)
from fabric.errors import DiscoveryError

logger = logging.getLogger(__name__)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(slots=True)
class _LeaseState:
    ttl_s: float
    deadline: float
    keys: set[str] = field(default_factory=set)


class _MemoryWatch:
    def __init__(self, registry: InMemoryRegistry, prefix: str, callback: WatchCallback) -> None:
        self.prefix = prefix
        self.callback = callback
        self.cancelled = False
        self._registry = registry

    @property
    def connected(self) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True
        self._registry._remove_watch(self)


class InMemoryRegistry:
    """A ``Registry`` in one process's memory (see the module docstring for delivery and time)."""

    def __init__(
        self, *, clock: Callable[[], float] | None = None, sweep_interval_s: float = 0.05
    ) -> None:
        self._clock = clock or time.monotonic
        self._sweeps = clock is None
        self._sweep_interval_s = sweep_interval_s
        self._lock = threading.Lock()
        self._deliver_lock = threading.RLock()
        self._data: dict[str, tuple[bytes, LeaseId | None]] = {}
        self._leases: dict[LeaseId, _LeaseState] = {}
        self._watches: list[_MemoryWatch] = []
        self._lease_ids = itertools.count(0x1000)
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- key-value ------------------------------------------------------------------------------

    def put(self, key: str, value: bytes, *, lease: Lease | None = None) -> None:
        self._check_open("put")
        with self._deliver_lock:
            with self._lock:
                events = self._expire_locked()
                missing = lease if lease is not None and lease.id not in self._leases else None
                if missing is None:
                    self._remove_locked(key)  # a re-put is one PUT, not DELETE + PUT
                    self._data[key] = (bytes(value), None if lease is None else lease.id)
                    if lease is not None:
                        self._leases[lease.id].keys.add(key)
                    events.append(WatchEvent(WatchEventKind.PUT, key, bytes(value)))
            self._deliver(events)
        if missing is not None:
            raise DiscoveryError(
                f"lease {missing.id:x} not found (expired or revoked): grant a new lease"
            )

    def get(self, key: str) -> bytes | None:
        self.expire_due()
        with self._lock:
            entry = self._data.get(key)
        return None if entry is None else entry[0]

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self.expire_due()
        with self._lock:
            return self._snapshot_locked(prefix)

    def delete(self, key: str) -> bool:
        self._check_open("delete")
        with self._deliver_lock:
            with self._lock:
                events = self._expire_locked()
                removed = self._remove_locked(key)
            self._deliver(events + removed)
        return bool(removed)

    # -- leases ---------------------------------------------------------------------------------

    def grant_lease(self, ttl_s: float) -> Lease:
        self._check_open("grant lease")
        if ttl_s <= 0:
            raise DiscoveryError(f"lease TTL must be positive, got {ttl_s}")
        with self._lock:
            lease_id = LeaseId(next(self._lease_ids))
            self._leases[lease_id] = _LeaseState(ttl_s, self._clock() + ttl_s)
            if self._sweeps and self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep, name="memory-registry-sweeper", daemon=True
                )
                self._sweeper.start()
        return Lease(lease_id, ttl_s)

    def keepalive(self, lease: Lease) -> bool:
        self.expire_due()
        with self._lock:
            state = self._leases.get(lease.id)
            if state is None:
                return False
            state.deadline = self._clock() + state.ttl_s
            return True

    def revoke(self, lease: Lease) -> None:
        self._check_open("revoke lease")
        with self._deliver_lock:
            with self._lock:
                events = self._expire_locked() + self._drop_lease_locked(lease.id)
            self._deliver(events)

    def expire_due(self) -> None:
        """Expire every lease whose deadline the clock has passed and deliver the DELETEs."""
        self._check_open("expire leases")
        self._expire_and_deliver()

    def _expire_and_deliver(self) -> None:
        with self._deliver_lock:
            with self._lock:
                events = self._expire_locked()
            self._deliver(events)

    # -- watches --------------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, callback: WatchCallback, *, include_existing: bool = False
    ) -> _MemoryWatch:
        self._check_open("watch")
        watch = _MemoryWatch(self, prefix, callback)
        with self._deliver_lock:
            with self._lock:
                events = self._expire_locked()
                existing = self._snapshot_locked(prefix) if include_existing else {}
            self._deliver(events)
            with self._lock:
                self._watches.append(watch)
            for event in diff_events({}, existing):
                _safe_call(watch, event)
        return watch

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.cancelled = True
        if self._sweeper is not None and self._sweeper is not threading.current_thread():
            self._sweeper.join(timeout=1.0)

    def _check_open(self, what: str) -> None:
        if self._closed.is_set():
            raise DiscoveryError(f"{what}: this InMemoryRegistry is closed")

    def _remove_watch(self, watch: _MemoryWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    # -- internals (callers hold self._lock) ------------------------------------------------

    def _snapshot_locked(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in self._data.items() if k.startswith(prefix)}

    def _remove_locked(self, key: str) -> list[WatchEvent]:
        entry = self._data.pop(key, None)
        if entry is None:
            return []
        value, lease_id = entry
        if lease_id is not None and lease_id in self._leases:
            self._leases[lease_id].keys.discard(key)
        return [WatchEvent(WatchEventKind.DELETE, key, value)]

    def _drop_lease_locked(self, lease_id: LeaseId) -> list[WatchEvent]:
        state = self._leases.pop(lease_id, None)
        if state is None:
            return []
        events: list[WatchEvent] = []
        for key in sorted(state.keys):
            value, _ = self._data.pop(key)
            events.append(WatchEvent(WatchEventKind.DELETE, key, value))
        return events

    def _expire_locked(self) -> list[WatchEvent]:
        now = self._clock()
        due = [lid for lid, state in self._leases.items() if state.deadline <= now]
        events: list[WatchEvent] = []
        for lease_id in due:
            logger.debug("lease %x expired", lease_id)
            events += self._drop_lease_locked(lease_id)
        return events

    def _deliver(self, events: list[WatchEvent]) -> None:
        """Hand events to matching watches; the caller holds ``_deliver_lock``, not ``_lock``."""
        if not events:
            return
        with self._lock:
            watches = list(self._watches)
        for event in events:
            for watch in watches:
                if not watch.cancelled and event.key.startswith(watch.prefix):
                    _safe_call(watch, event)

    def _sweep(self) -> None:
        while not self._closed.wait(self._sweep_interval_s):
            self._expire_and_deliver()


def _safe_call(watch: _MemoryWatch, event: WatchEvent) -> None:
    try:
        watch.callback(event)
    except Exception:
        logger.exception("watch callback for prefix %r failed on %s", watch.prefix, event.key)
