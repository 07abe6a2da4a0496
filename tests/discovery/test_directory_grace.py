"""WorkerDirectory's grace before a LEFT: over every registry, with a watch that disconnects (an
in-memory fake), and against a real etcd paused past the lease TTL (SIGSTOP, then SIGCONT)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
from discovery_harness import BOUND_S, TTL_S, messages, record_of

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import (
    WorkerDirectory,
    WorkerEvent,
    WorkerEventKind,
    WorkerRegistration,
)
from fabric.discovery.registry import Registry, WatchCallback
from fabric.errors import ConfigError

JOINED, UPDATED, LEFT = WorkerEventKind.JOINED, WorkerEventKind.UPDATED, WorkerEventKind.LEFT


class Events:
    """An ``on_change`` that records ``(kind, worker_id)`` and when each arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[WorkerEventKind, str, float]] = []
        self._cond = threading.Condition()

    def __call__(self, event: WorkerEvent) -> None:
        with self._cond:
            self.seen.append((event.kind, event.record.worker_id, time.monotonic()))
            self._cond.notify_all()

    def kinds(self) -> list[tuple[WorkerEventKind, str]]:
        with self._cond:
            return [(kind, worker_id) for kind, worker_id, _ in self.seen]

    def wait_left(self, worker_id: str, timeout_s: float) -> float | None:
        """When ``worker_id`` was reported LEFT (None: not within ``timeout_s``)."""

        def left_at() -> float | None:
            return next((t for k, w, t in self.seen if k is LEFT and w == worker_id), None)

        with self._cond:
            self._cond.wait_for(lambda: left_at() is not None, timeout_s)
            return left_at()


def test_a_vanished_worker_leaves_only_after_the_grace(registry: Registry, namespace: str) -> None:
    grace_s = 1.5
    events = Events()
    orphan = record_of("p-orphan")
    lease = registry.grant_lease(30)
    registry.put(orphan.key(namespace), orphan.to_bytes(), lease=lease)
    with WorkerDirectory(registry, namespace=namespace, on_change=events, grace_s=grace_s) as d:
        registry.revoke(lease)  # gone, with no leaving mark: as if its lease had expired
        revoked_at = time.monotonic()
        assert d.wait_for(lambda w: "p-orphan" not in w, grace_s + BOUND_S)
        left_at = events.wait_left("p-orphan", BOUND_S)
    assert left_at is not None and left_at - revoked_at >= grace_s - 0.1
    assert events.kinds() == [(JOINED, "p-orphan"), (LEFT, "p-orphan")]


def test_a_record_back_within_the_grace_is_no_leave(registry: Registry, namespace: str) -> None:
    events = Events()
    same, changed = record_of("p-same"), record_of("p-changed")
    restarted = dataclasses.replace(changed, started_at=changed.started_at + 1)
    leases = {r.worker_id: registry.grant_lease(30) for r in (same, changed)}
    for r in (same, changed):
        registry.put(r.key(namespace), r.to_bytes(), lease=leases[r.worker_id])
    with WorkerDirectory(registry, namespace=namespace, on_change=events, grace_s=60) as d:
        for r, back in ((same, same), (changed, restarted)):
            registry.revoke(leases[r.worker_id])
            assert d.get(r.worker_id) == r  # still listed while its record is gone
            registry.put(r.key(namespace), back.to_bytes(), lease=registry.grant_lease(30))
        assert d.wait_for(lambda w: w.get("p-changed") == restarted, BOUND_S)
        assert d.get("p-same") == same
    assert events.kinds() == [(JOINED, "p-changed"), (JOINED, "p-same"), (UPDATED, "p-changed")]


def test_a_closed_registration_leaves_at_once_despite_the_grace(
    registry: Registry, namespace: str
) -> None:
    events = Events()
    with WorkerDirectory(registry, namespace=namespace, on_change=events, grace_s=60) as d:
        registration = WorkerRegistration(
            registry, record_of("d-bye"), ttl_s=TTL_S, namespace=namespace
        ).start()
        assert d.wait_for(lambda w: "d-bye" in w, BOUND_S)
        closed_at = time.monotonic()
        registration.close()  # marks the record leaving, then revokes its lease
        left_at = events.wait_left("d-bye", BOUND_S)
        assert left_at is not None and left_at - closed_at < BOUND_S
        assert d.workers() == {}
    assert events.kinds() == [(JOINED, "d-bye"), (LEFT, "d-bye")]
    assert registry.get(record_of("d-bye").key(namespace)) is None


def test_a_negative_grace_is_refused(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="grace_s"):
        WorkerDirectory(registry, grace_s=-1)


# -- a watch that loses its server ---------------------------------------------------------------


class SwitchableWatch:
    """An in-memory watch whose ``connected`` the test sets."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.up = True

    @property
    def connected(self) -> bool:
        return self.up

    def cancel(self) -> None:
        self.inner.cancel()  # type: ignore[attr-defined]


class DisconnectingRegistry(InMemoryRegistry):
    """An ``InMemoryRegistry`` whose watches can be marked disconnected (``set_connected``)."""

    def __init__(self) -> None:
        super().__init__()
        self.watches: list[SwitchableWatch] = []

    def watch_prefix(  # type: ignore[override]
        self, prefix: str, callback: WatchCallback, *, include_existing: bool = False
    ) -> SwitchableWatch:
        watch = SwitchableWatch(
            super().watch_prefix(prefix, callback, include_existing=include_existing)
        )
        self.watches.append(watch)
        return watch

    def set_connected(self, up: bool) -> None:
        for watch in self.watches:
            watch.up = up


def test_no_worker_is_dropped_while_the_watch_is_disconnected(namespace: str) -> None:
    grace_s = 0.5
    registry = DisconnectingRegistry()
    events = Events()
    record = record_of("p-patient")
    registry.put(record.key(namespace), record.to_bytes())
    try:
        with WorkerDirectory(registry, namespace=namespace, on_change=events, grace_s=grace_s) as d:
            registry.delete(record.key(namespace))
            registry.set_connected(False)
            threading.Event().wait(3 * grace_s)  # the grace runs out while disconnected
            assert d.get("p-patient") == record
            registry.set_connected(True)
            reconnected_at = time.monotonic()
            left_at = events.wait_left("p-patient", BOUND_S)
            assert left_at is not None
            # a fresh grace from about the reconnection (the thread looks every 0.25 s)
            assert left_at - reconnected_at >= grace_s - 0.3
            assert d.workers() == {}
    finally:
        registry.close()
    assert events.kinds() == [(JOINED, "p-patient"), (LEFT, "p-patient")]


# -- a real etcd stalled past the lease TTL ------------------------------------------------------


@pytest.mark.etcd
def test_an_etcd_stall_past_the_ttl_does_not_flap_the_directory(
    fresh_etcd: EtcdServer, namespace: str, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    stall_s = 3 * TTL_S
    worker_registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=1)
    router_registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=1)
    record = record_of("steadfast")
    events = Events()
    registration = WorkerRegistration(worker_registry, record, ttl_s=TTL_S, namespace=namespace)
    directory = WorkerDirectory(
        router_registry, namespace=namespace, on_change=events, grace_s=5 * TTL_S
    )
    try:
        old_lease = registration.start().lease
        directory.start()
        assert directory.get("steadfast") == record
        fresh_etcd.pause()
        try:
            threading.Event().wait(stall_s)
            assert not registration.registered  # its keepalives went unanswered
        finally:
            fresh_etcd.resume()
        assert wait_until(lambda: registration.registered, BOUND_S)
        assert router_registry.get(record.key(namespace)) == record.to_bytes()
        assert registration.lease is not None and old_lease is not None
        assert registration.lease.id != old_lease.id  # the old lease expired in the stall
        assert directory.get("steadfast") == record
        threading.Event().wait(1.0)  # late events, if any, would arrive now
        assert events.kinds() == [(JOINED, "steadfast")]  # never LEFT, never re-JOINED
    finally:
        registration.close()
        directory.close()
        worker_registry.close()
        router_registry.close()
    warnings = messages(caplog, logging.WARNING)
    assert any("steadfast" in m and "vanished" in m for m in warnings)  # the grace was needed
    assert any("restored" in m and "a new lease" in m for m in messages(caplog, logging.INFO))
