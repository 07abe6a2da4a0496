"""A worker's self-healing registration, and the live directory of workers that routers read.

Owns two things on top of any ``Registry``:

``WorkerRegistration`` keeps one ``WorkerRecord`` under a lease for as long as it is open::

    created ──start()──▶ REGISTERED ──keepalive fails / lease gone──▶ LOST ──re-put──▶ REGISTERED
                              │                                         │
                              └───────────────── close() ◀──────────────┘ ──▶ CLOSED (revoked)

* ``start`` registers synchronously (grant, put) and raises ``DiscoveryError`` if it cannot, so a
  worker fails fast at boot; afterwards a daemon thread sends keepalives every ``ttl / 3``.
* The thread never gives up. When a call fails (etcd down) or the lease is gone (expired during
  an outage, revoked, or etcd wiped), it logs one WARNING, then retries with capped exponential
  backoff (at most ``ttl / 3`` apart): a lease that survived is kept and the record re-put; a lost
  one is replaced by a new lease. One INFO line reports the restoration and the time it took.
* ``close`` stops the thread, which revokes the lease on its way out (the record disappears at
  once), and joins it within ``close_timeout_s``. If etcd is unreachable then, the record
  expires by itself one TTL later. A killed process's record expires the same way.

``WorkerDirectory`` (and the lower-level ``watch_workers``) turns one prefix watch with
``include_existing`` into JOINED / UPDATED / LEFT events and a ``worker_id -> WorkerRecord`` map.
It inherits the watch's recovery: after an outage it converges to the registry's contents.
Malformed records (another version, bad JSON) are logged at WARNING and skipped. Worker ids must
be unique across roles for a directory that watches every role.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import (
    DEFAULT_NAMESPACE,
    Backoff,
    Lease,
    Registry,
    Role,
    Watch,
    WatchEvent,
    WatchEventKind,
    parse_worker_key,
    workers_prefix,
)
from fabric.errors import DiscoveryError, InvalidTransition

logger = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.1


class WorkerRegistration:
    """Keeps ``record`` registered under a lease until ``close`` (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        record: WorkerRecord,
        *,
        ttl_s: float = 5.0,
        namespace: str = DEFAULT_NAMESPACE,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.record = record
        self.key = record.key(namespace)
        self.ttl_s = ttl_s
        self.close_timeout_s = close_timeout_s
        self._registry = registry
        self._value = record.to_bytes()
        self._lease: Lease | None = None
        self._lost_at: float | None = None
        self._interval_s = max(_MIN_INTERVAL_S, ttl_s / 3)
        self._backoff = Backoff(initial_s=_MIN_INTERVAL_S, max_s=self._interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def registered(self) -> bool:
        """True while the record is believed present (False between a loss and its repair)."""
        return self._lease is not None and self._lost_at is None and not self._stop.is_set()

    @property
    def lease(self) -> Lease | None:
        """The lease the record is under now (a replaced lease gets a new id)."""
        return self._lease

    def start(self) -> WorkerRegistration:
        """Register now (DiscoveryError if the registry cannot be reached), then keep it alive."""
        if self._thread is not None or self._stop.is_set():
            raise InvalidTransition(f"registration of {self.key} was already started")
        try:
            lease = self._register()
        except DiscoveryError:
            self._revoke_held_lease()
            raise
        logger.info("registered %s under lease %x (ttl %.0f s)", self.key, lease.id, lease.ttl_s)
        self._thread = threading.Thread(
            target=self._run, name=f"registration:{self.record.worker_id}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Revoke the lease (the record disappears at once) and stop the thread; idempotent."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            logger.warning(
                "registration thread of %s did not stop within %.1f s; its record expires "
                "within %.0f s",
                self.key,
                self.close_timeout_s,
                self.ttl_s,
            )

    def __enter__(self) -> WorkerRegistration:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _register(self) -> Lease:
        self._lease = lease = self._registry.grant_lease(self.ttl_s)
        self._interval_s = max(_MIN_INTERVAL_S, lease.ttl_s / 3)
        self._registry.put(self.key, self._value, lease=lease)
        return lease

    def _run(self) -> None:
        delay = self._interval_s
        try:
            while not self._stop.wait(delay):
                delay = self._tick()
        finally:
            self._revoke_held_lease()

    def _tick(self) -> float:
        """One keepalive or repair step; returns the delay before the next one."""
        try:
            if self._lease is None:
                self._restored("a new lease", self._register())
            elif self._registry.keepalive(self._lease):
                if self._lost_at is not None:
                    self._registry.put(self.key, self._value, lease=self._lease)
                    self._restored("the lease survived", self._lease)
            else:
                self._mark_lost(f"lease {self._lease.id:x} expired or was revoked")
                self._lease = None
                return 0.0
        except DiscoveryError as exc:
            self._mark_lost(str(exc))
            return self._backoff.next_delay()
        self._backoff.reset()
        return self._interval_s

    def _mark_lost(self, reason: str) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            logger.warning("registration of %s lost (%s); re-registering", self.key, reason)
        else:
            logger.debug("registration of %s still lost (%s)", self.key, reason)

    def _restored(self, how: str, lease: Lease) -> None:
        if self._lost_at is not None:
            logger.info(
                "registration of %s restored after %.1f s (%s, lease %x)",
                self.key,
                time.monotonic() - self._lost_at,
                how,
                lease.id,
            )
            self._lost_at = None

    def _revoke_held_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            self._registry.revoke(lease)
        except DiscoveryError as exc:
            logger.warning(
                "could not revoke lease %x of %s (%s); the record expires within %.0f s",
                lease.id,
                self.key,
                exc,
                lease.ttl_s,
            )


class WorkerEventKind(Enum):
    JOINED = "joined"
    UPDATED = "updated"
    LEFT = "left"


@dataclass(frozen=True)
class WorkerEvent:
    """A worker joined, changed its record, or left; ``record`` is its (last) record."""

    kind: WorkerEventKind
    record: WorkerRecord


def watch_workers(
    registry: Registry,
    callback: Callable[[WorkerEvent], None],
    *,
    role: Role | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> Watch:
    """Watch worker records (of one role, when given): existing ones arrive first as JOINED."""
    key_to_record: dict[str, WorkerRecord] = {}

    def on_event(event: WatchEvent) -> None:
        if parse_worker_key(event.key, namespace) is None:
            return
        if event.kind is WatchEventKind.DELETE:
            record = key_to_record.pop(event.key, None)
            if record is not None:
                callback(WorkerEvent(WorkerEventKind.LEFT, record))
            return
        try:
            record = WorkerRecord.from_bytes(event.value or b"", key=event.key)
        except DiscoveryError as exc:
            logger.warning("skipping a worker record: %s", exc)
            return
        kind = WorkerEventKind.UPDATED if event.key in key_to_record else WorkerEventKind.JOINED
        key_to_record[event.key] = record
        callback(WorkerEvent(kind, record))

    return registry.watch_prefix(workers_prefix(namespace, role), on_event, include_existing=True)


class WorkerDirectory:
    """A live ``worker_id -> WorkerRecord`` map kept by ``watch_workers``."""

    def __init__(
        self,
        registry: Registry,
        *,
        role: Role | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        on_change: Callable[[WorkerEvent], None] | None = None,
    ) -> None:
        self.role = role
        self.namespace = namespace
        self._registry = registry
        self._on_change = on_change
        self._cond = threading.Condition()
        self._id_to_record: dict[str, WorkerRecord] = {}
        self._watch: Watch | None = None

    @property
    def connected(self) -> bool:
        """False while the underlying watch is re-establishing itself (the map may be stale)."""
        return self._watch is not None and self._watch.connected

    def start(self) -> WorkerDirectory:
        if self._watch is not None:
            raise InvalidTransition("this WorkerDirectory was already started")
        self._watch = watch_workers(
            self._registry, self._apply, role=self.role, namespace=self.namespace
        )
        return self

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    def workers(self) -> dict[str, WorkerRecord]:
        """A snapshot of the current workers."""
        with self._cond:
            return dict(self._id_to_record)

    def get(self, worker_id: str) -> WorkerRecord | None:
        with self._cond:
            return self._id_to_record.get(worker_id)

    def wait_for(
        self, predicate: Callable[[dict[str, WorkerRecord]], bool], timeout_s: float
    ) -> bool:
        """Wait until ``predicate(workers)`` holds; False if it did not within ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._id_to_record), timeout_s)

    def __enter__(self) -> WorkerDirectory:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _apply(self, event: WorkerEvent) -> None:
        worker_id = event.record.worker_id
        with self._cond:
            if event.kind is WorkerEventKind.LEFT:
                self._id_to_record.pop(worker_id, None)
            else:
                self._id_to_record[worker_id] = event.record
            self._cond.notify_all()
        logger.debug("worker %s %s", worker_id, event.kind.value)
        if self._on_change is not None:
            self._on_change(event)
