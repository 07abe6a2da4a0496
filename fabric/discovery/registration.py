"""A worker's self-healing registration, and the live directory of workers that routers read.

Owns two things on top of any ``Registry``:

``WorkerRegistration`` keeps one ``WorkerRecord`` under a lease for as long as it is open::

                         keepalive fails / lease gone / record deleted
    created ──start()──▶ REGISTERED ───────────────────────────────────▶ LOST
                          │   ▲                                           │
                          │   └── record re-put (same lease or a new one) ┘
                          │                                               │
                          │   drain(): record re-put marked draining (still REGISTERED)
                          └──── close(): record marked leaving, lease ◀───┘
                                revoked ──▶ CLOSED

* ``start`` registers synchronously (grant, put) and raises ``DiscoveryError`` if it cannot, so a
  worker fails fast at boot; afterwards a daemon thread sends keepalives every ``ttl / 3`` and,
  after each one that succeeds, reads its key back (one range read).
* The thread never gives up. When a call fails (etcd down), the lease is gone (expired during
  an outage, revoked, or etcd wiped) or the record is gone under a live lease (someone deleted
  the key), it logs one WARNING, then repairs with capped exponential backoff (at most
  ``ttl / 3`` apart): a lease that survived is kept and the record re-put; a lost one is replaced
  by a new lease. One INFO line reports the restoration and the time it took. A deleted record
  is therefore back within one keepalive interval. A key holding another value (a second
  process with the same worker id) is left alone.
* ``drain`` re-puts the record marked ``draining`` under the same lease (routers stop choosing
  the worker; directories keep it live, so its open requests and holds are still served); every
  later re-put keeps the mark. A failed put counts as a loss: the thread's repair re-puts it.
* ``close`` stops the thread, which on its way out puts the record once more marked
  ``leaving`` (directories drop it at once, without their grace) and revokes the lease (the
  record disappears), then joins it within ``close_timeout_s``. If etcd is unreachable then,
  the record expires by itself one TTL later, and directories drop it after their grace. A
  killed process's record expires the same way.

``WorkerDirectory`` (and the lower-level ``watch_workers``) turns one prefix watch with
``include_existing`` into JOINED / UPDATED / LEFT events and a ``worker_id -> WorkerRecord`` map.
It inherits the watch's recovery: after an outage it converges to the registry's contents.
Malformed records (another version, bad JSON) are logged at WARNING and skipped. Worker ids must
be unique across roles for a directory that watches every role.

A directory's ``grace_s`` is how long it keeps a worker whose record vanished without a leaving
mark (its lease expired, or its key was deleted)::

    (absent) ──JOINED──▶ LIVE ──record vanished, grace_s > 0──▶ VANISHED (still listed, no event)
                          ▲ │                                      │  │
                          │ └── leaving mark, or vanished with ────┼──┼──▶ LEFT (absent)
                          │     grace_s == 0                       │  │
                          └──── record back: no event (same) ──────┘  └── grace_s of connected
                                or UPDATED (changed)                       watch passed ──▶ LEFT

* The grace is counted while the watch is connected only: whenever the directory sees its watch
  disconnected (etcd unreachable), every vanished worker's deadline moves to ``grace_s`` from
  then, so no worker is dropped while the directory cannot see whether it came back.
* ``grace_s = 0`` (the default) is exact: a vanished record is a LEFT at once. Consumers that
  must not talk to a worker whose record is gone use it. Routers use ``ROUTER_GRACE_S``: an
  etcd stall longer than the lease TTL expires every lease at once, and each worker re-registers
  within one keepalive interval after etcd answers again; without the grace every worker would
  leave and rejoin. The price: a killed worker stays listed for its TTL plus the grace.
* ``on_change`` calls never overlap; they run on the watch's thread, or (LEFT after a grace) on
  the directory's grace thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

import fabric.discovery.metrics as etcd_metrics
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
from fabric.errors import ConfigError, DiscoveryError, InvalidTransition

logger = logging.getLogger(__name__)

_MIN_INTERVAL_S = 0.1

DEFAULT_TTL_S = 5.0
"""A registration's lease TTL unless told otherwise (``ServeConfig.registration_ttl_s``)."""

ROUTER_GRACE_S = DEFAULT_TTL_S
"""The grace a router's directory gives a vanished record: one default lease TTL. After etcd
answers again, a registration finds its lease gone at its next keepalive, at most one backoff
step (``ttl / 3``, jittered: 2 s) later, and re-registers in two calls; the rest is margin for a
loaded host. A longer grace would keep a killed worker routed longer (its TTL plus the grace)."""

_DISCONNECTED_POLL_S = 0.25
"""How often the grace thread looks at the watch while vanished workers wait out their grace."""


class WorkerRegistration:
    """Keeps ``record`` registered under a lease until ``close`` (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        record: WorkerRecord,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        namespace: str = DEFAULT_NAMESPACE,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.record = record
        self.key = record.key(namespace)
        self.ttl_s = ttl_s
        self.close_timeout_s = close_timeout_s
        self._registry = registry
        self._value = record.to_bytes()
        self._leaving_value = dataclasses.replace(record, leaving=True).to_bytes()
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
            self._release_lease(announce=False)
            raise
        logger.info("registered %s under lease %x (ttl %.0f s)", self.key, lease.id, lease.ttl_s)
        self._thread = threading.Thread(
            target=self._run, name=f"registration:{self.record.worker_id}", daemon=True
        )
        self._thread.start()
        return self

    def drain(self) -> None:
        """Mark the record ``draining`` now and in every later re-put (idempotent)."""
        if self.record.draining:
            return
        self.record = dataclasses.replace(self.record, draining=True)
        self._value = self.record.to_bytes()
        lease = self._lease
        if lease is None or self._stop.is_set():
            return  # lost or closing: the repair (or nobody) puts the new value
        try:
            self._registry.put(self.key, self._value, lease=lease)
        except DiscoveryError as exc:
            self._mark_lost(f"marking it draining failed: {exc}")
            return
        logger.info("%s marked draining", self.key)

    def close(self) -> None:
        """Mark the record leaving, revoke the lease and stop the thread; idempotent."""
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
            self._release_lease(announce=True)

    def _tick(self) -> float:
        """One keepalive or repair step; returns the delay before the next one."""
        try:
            lease = self._lease
            if lease is None:
                self._restored("a new lease", self._register())
                etcd_metrics.LEASE_REGRANTS.inc()
            elif not self._registry.keepalive(lease):
                self._mark_lost(f"lease {lease.id:x} expired or was revoked")
                self._lease = None
                return 0.0
            elif self._lost_at is not None:
                self._registry.put(self.key, self._value, lease=lease)
                self._restored("the lease survived", lease)
            elif self._registry.get(self.key) is None:
                self._mark_lost("its record was deleted while its lease lives")
                self._registry.put(self.key, self._value, lease=lease)
                self._restored("the record re-put under the live lease", lease)
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

    def _release_lease(self, *, announce: bool) -> None:
        """Revoke the held lease; with ``announce``, first mark the record leaving.

        A failed call skips the rest (etcd is unreachable, or the lease is already gone): the
        record then expires with its lease.
        """
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            if announce:
                self._registry.put(self.key, self._leaving_value, lease=lease)
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
    """A worker joined, changed its record, or left; ``record`` is its (last) record.

    A LEFT whose record is ``leaving`` is a worker that shut down; any other LEFT is a record
    that vanished (lease expired, key deleted).
    """

    kind: WorkerEventKind
    record: WorkerRecord


def watch_workers(
    registry: Registry,
    callback: Callable[[WorkerEvent], None],
    *,
    role: Role | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> Watch:
    """Watch worker records (of one role, when given): existing ones arrive first as JOINED.

    A record re-put unchanged is no event. A record marked ``leaving`` is a LEFT at once (and its
    key's deletion is then silent); one that was never seen is skipped.
    """
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
        if record.leaving:
            if key_to_record.pop(event.key, None) is not None:
                callback(WorkerEvent(WorkerEventKind.LEFT, record))
            return
        old = key_to_record.get(event.key)
        if old == record:
            return  # re-put unchanged (a registration repairing itself)
        kind = WorkerEventKind.JOINED if old is None else WorkerEventKind.UPDATED
        key_to_record[event.key] = record
        callback(WorkerEvent(kind, record))

    return registry.watch_prefix(workers_prefix(namespace, role), on_event, include_existing=True)


class WorkerDirectory:
    """A live ``worker_id -> WorkerRecord`` map kept by ``watch_workers``, with a grace period
    before a vanished worker leaves (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        *,
        role: Role | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        on_change: Callable[[WorkerEvent], None] | None = None,
        grace_s: float = 0.0,
    ) -> None:
        """Args:
        grace_s: how long a worker whose record vanished stays listed (0: it leaves at once;
            ``ROUTER_GRACE_S`` for routers).
        """
        if grace_s < 0:
            raise ConfigError(f"grace_s={grace_s} must be >= 0")
        self.role = role
        self.namespace = namespace
        self.grace_s = grace_s
        self._registry = registry
        self._on_change = on_change
        self._cond = threading.Condition()
        self._deliver_lock = threading.Lock()  # held from a map change to its on_change call
        self._id_to_record: dict[str, WorkerRecord] = {}
        self._id_to_deadline: dict[str, float] = {}  # vanished workers: when they leave
        self._watch: Watch | None = None
        self._closed = False
        self._grace_thread: threading.Thread | None = None

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
        if self.grace_s > 0:
            self._grace_thread = threading.Thread(
                target=self._run_grace, name=f"directory-grace:{self.namespace}", daemon=True
            )
            self._grace_thread.start()
        return self

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._grace_thread is not None and self._grace_thread is not threading.current_thread():
            self._grace_thread.join(timeout=5.0)

    def workers(self) -> dict[str, WorkerRecord]:
        """A snapshot of the current workers (those waiting out their grace included)."""
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
        """Watch callback: update the map, then tell ``on_change`` what it should see."""
        with self._deliver_lock:
            with self._cond:
                visible = self._apply_locked(event)
                self._cond.notify_all()
            if visible is not None:
                self._deliver(visible)

    def _apply_locked(self, event: WorkerEvent) -> WorkerEvent | None:
        worker_id = event.record.worker_id
        was_vanished = self._id_to_deadline.pop(worker_id, None) is not None
        if event.kind is WorkerEventKind.LEFT:
            if self.grace_s > 0 and not event.record.leaving:
                self._id_to_deadline[worker_id] = time.monotonic() + self.grace_s
                logger.warning(
                    "worker %s: its record vanished; kept for a grace of %.1f s",
                    worker_id,
                    self.grace_s,
                )
                return None
            self._id_to_record.pop(worker_id, None)
            return event
        old = self._id_to_record.get(worker_id)
        self._id_to_record[worker_id] = event.record
        if not was_vanished:
            return event
        logger.info("worker %s: its record is back within the grace", worker_id)
        return None if old == event.record else WorkerEvent(WorkerEventKind.UPDATED, event.record)

    def _run_grace(self) -> None:
        """The grace thread: a vanished worker leaves once ``grace_s`` of connected watch passed."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                if self._id_to_deadline and not self.connected:
                    for worker_id, deadline in self._id_to_deadline.items():
                        self._id_to_deadline[worker_id] = max(deadline, now + self.grace_s)
                due = any(deadline <= now for deadline in self._id_to_deadline.values())
                if not due:
                    next_deadline = min(self._id_to_deadline.values(), default=None)
                    timeout = (
                        None
                        if next_deadline is None
                        else min(next_deadline - now, _DISCONNECTED_POLL_S)
                    )
                    self._cond.wait(timeout)
                    continue
            self._leave_due()

    def _leave_due(self) -> None:
        """Remove the vanished workers whose grace is over, and report them LEFT."""
        with self._deliver_lock:
            with self._cond:
                now = time.monotonic()
                due = [wid for wid, deadline in self._id_to_deadline.items() if deadline <= now]
                records = [self._id_to_record.pop(wid) for wid in due]
                for worker_id in due:
                    del self._id_to_deadline[worker_id]
                self._cond.notify_all()
            for record in records:
                logger.info(
                    "worker %s left: its record stayed gone past the grace", record.worker_id
                )
                try:
                    self._deliver(WorkerEvent(WorkerEventKind.LEFT, record))
                except Exception:  # as a watch does with its callback's errors
                    logger.exception("on_change failed on %s leaving", record.worker_id)

    def _deliver(self, event: WorkerEvent) -> None:
        logger.debug("worker %s %s", event.record.worker_id, event.kind.value)
        if self._on_change is not None:
            self._on_change(event)
