"""WorkerRegistration and WorkerDirectory: over every registry, then against real etcd failures
(a SIGKILLed worker process, an etcd stopped and restarted with or without its data). The
directory's grace before a LEFT: ``test_directory_grace``."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from discovery_harness import BOUND_S, TTL_S, messages, record_of

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registration import (
    WorkerDirectory,
    WorkerEvent,
    WorkerEventKind,
    WorkerRegistration,
)
from fabric.discovery.registry import Registry, Role
from fabric.errors import DiscoveryError, InvalidTransition

REPO_ROOT = Path(__file__).resolve().parents[2]


def registration_threads(worker_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"registration:{worker_id}"]


# -- over every registry -----------------------------------------------------------------------


def test_record_lives_while_open_and_vanishes_at_close(registry: Registry, namespace: str) -> None:
    record = record_of("alive")
    registration = WorkerRegistration(registry, record, ttl_s=TTL_S, namespace=namespace)
    with registration:
        assert registration.registered
        assert registry.get(record.key(namespace)) == record.to_bytes()
        threading.Event().wait(2.5 * TTL_S)  # keepalives carry it past several TTLs
        assert registry.get(record.key(namespace)) == record.to_bytes()
    assert registry.get(record.key(namespace)) is None  # revoked at once, no TTL wait
    assert not registration.registered
    assert registration_threads("alive") == []
    registration.close()  # idempotent


def test_a_lost_lease_is_replaced_by_itself(
    registry: Registry, namespace: str, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    record = record_of("phoenix")
    with WorkerRegistration(registry, record, ttl_s=TTL_S, namespace=namespace) as registration:
        old = registration.lease
        assert old is not None
        registry.revoke(old)  # as if the lease had expired during a long stall
        assert registry.get(record.key(namespace)) is None
        assert wait_until(lambda: registry.get(record.key(namespace)) is not None, BOUND_S)
        assert registration.lease is not None and registration.lease.id != old.id
        assert wait_until(lambda: registration.registered, BOUND_S)
    assert any("phoenix" in m and "lost" in m for m in messages(caplog, logging.WARNING))
    assert any("restored" in m and "a new lease" in m for m in messages(caplog, logging.INFO))


def test_a_deleted_record_is_back_within_one_keepalive(
    registry: Registry, namespace: str, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    record = record_of("undeletable")
    key = record.key(namespace)
    events: list[WorkerEventKind] = []
    with (
        WorkerRegistration(registry, record, ttl_s=TTL_S, namespace=namespace) as registration,
        WorkerDirectory(registry, namespace=namespace, on_change=lambda e: events.append(e.kind)),
    ):
        lease = registration.lease
        assert lease is not None
        assert registry.delete(key)  # an operator's `etcdctl del`: the lease lives on
        deleted_at = time.monotonic()
        assert wait_until(lambda: registry.get(key) == record.to_bytes(), BOUND_S)
        # one keepalive interval (ttl / 3), plus the calls themselves on a loaded host
        assert time.monotonic() - deleted_at < lease.ttl_s / 3 + 1.0
        assert registration.lease == lease  # re-put under the live lease, not a new one
        assert wait_until(lambda: registration.registered, BOUND_S)
        assert wait_until(lambda: len(events) == 3, BOUND_S)
    # a directory without grace saw the worker leave and come back
    assert events[:3] == [WorkerEventKind.JOINED, WorkerEventKind.LEFT, WorkerEventKind.JOINED]
    warnings = [m for m in messages(caplog, logging.WARNING) if "undeletable" in m]
    assert len(warnings) == 1 and "deleted while its lease lives" in warnings[0]
    assert any("restored" in m and "re-put" in m for m in messages(caplog, logging.INFO))


def test_a_draining_record_stays_live_and_keeps_its_mark(
    registry: Registry, namespace: str, wait_until
) -> None:
    record = record_of("drainer", Role.DECODE)
    key = record.key(namespace)
    events: list[tuple[WorkerEventKind, bool]] = []
    with (
        WorkerRegistration(registry, record, ttl_s=TTL_S, namespace=namespace) as registration,
        WorkerDirectory(
            registry,
            namespace=namespace,
            on_change=lambda e: events.append((e.kind, e.record.draining)),
        ) as directory,
    ):
        assert directory.wait_for(lambda w: "drainer" in w, BOUND_S)
        registration.drain()
        registration.drain()  # idempotent: one update
        assert directory.wait_for(lambda w: w["drainer"].draining, BOUND_S)
        assert registration.registered  # still registered: it serves what it holds
        assert registry.delete(key)  # a re-put after a loss keeps the mark
        assert wait_until(lambda: registry.get(key) == registration.record.to_bytes(), BOUND_S)
        assert registration.record == dataclasses.replace(record, draining=True)
    assert registry.get(key) is None
    assert events[:2] == [(WorkerEventKind.JOINED, False), (WorkerEventKind.UPDATED, True)]


def test_registration_lifecycle_misuse_raises(registry: Registry, namespace: str) -> None:
    registration = WorkerRegistration(registry, record_of("once"), ttl_s=TTL_S, namespace=namespace)
    registration.start()
    with pytest.raises(InvalidTransition):
        registration.start()
    registration.close()
    with pytest.raises(InvalidTransition):
        registration.start()
    never_started = WorkerRegistration(registry, record_of("never"), namespace=namespace)
    never_started.close()


def test_directory_sees_joins_updates_and_leaves(
    registry: Registry, namespace: str, wait_until
) -> None:
    early = WorkerRegistration(registry, record_of("p-early"), ttl_s=TTL_S, namespace=namespace)
    early.start()
    events: list[tuple[WorkerEventKind, str]] = []

    def on_change(event: WorkerEvent) -> None:
        events.append((event.kind, event.record.worker_id))

    directory = WorkerDirectory(registry, namespace=namespace, on_change=on_change)
    with directory:
        assert directory.connected
        assert set(directory.workers()) == {"p-early"}  # existing workers are there at start
        late = WorkerRegistration(
            registry, record_of("d-late", Role.DECODE), ttl_s=TTL_S, namespace=namespace
        ).start()
        assert directory.wait_for(lambda w: "d-late" in w, BOUND_S)
        assert directory.get("d-late") == late.record

        moved = record_of("d-late", Role.DECODE, port=6666)
        registry.put(moved.key(namespace), moved.to_bytes(), lease=late.lease)
        assert directory.wait_for(lambda w: w["d-late"] == moved, BOUND_S)

        early.close()
        assert directory.wait_for(lambda w: "p-early" not in w, BOUND_S)

        orphan = record_of("p-orphan")  # registered under a lease nobody keeps alive
        registry.put(orphan.key(namespace), orphan.to_bytes(), lease=registry.grant_lease(TTL_S))
        assert directory.wait_for(lambda w: "p-orphan" in w, BOUND_S)
        assert directory.wait_for(lambda w: "p-orphan" not in w, BOUND_S)
        late.close()
        assert directory.wait_for(lambda w: not w, BOUND_S)
    assert events == [
        (WorkerEventKind.JOINED, "p-early"),
        (WorkerEventKind.JOINED, "d-late"),
        (WorkerEventKind.UPDATED, "d-late"),
        (WorkerEventKind.LEFT, "p-early"),
        (WorkerEventKind.JOINED, "p-orphan"),
        (WorkerEventKind.LEFT, "p-orphan"),
        (WorkerEventKind.LEFT, "d-late"),
    ]


def test_directory_filters_by_role_and_skips_malformed_records(
    registry: Registry, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefill, decode = record_of("p-0"), record_of("d-0", Role.DECODE)
    registry.put(prefill.key(namespace), prefill.to_bytes())
    registry.put(decode.key(namespace), decode.to_bytes())
    registry.put(f"/{namespace}/workers/decode/d-bad", b"{not json")
    with WorkerDirectory(registry, role=Role.DECODE, namespace=namespace) as directory:
        assert directory.workers() == {"d-0": decode}
    assert any("d-bad" in m for m in messages(caplog, logging.WARNING))


def test_start_fails_fast_when_etcd_is_unreachable() -> None:
    registry = EtcdRegistry("http://127.0.0.1:1", timeout_s=0.5)
    try:
        registration = WorkerRegistration(registry, record_of("nowhere"), ttl_s=TTL_S)
        with pytest.raises(DiscoveryError, match="etcd is running"):
            registration.start()
        assert registration_threads("nowhere") == []
        with pytest.raises(DiscoveryError):
            WorkerDirectory(registry).start()
    finally:
        registry.close()


# -- against real etcd failures --------------------------------------------------------------

CHILD = """
import sys, time
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role

endpoint, namespace, ttl_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
record = WorkerRecord("victim", Role.PREFILL, Endpoints(), None, FabricLayout(), 0, time.time())
registry = EtcdRegistry(endpoint, timeout_s=2)
WorkerRegistration(registry, record, ttl_s=ttl_s, namespace=namespace).start()
time.sleep(120)
"""


@pytest.mark.etcd
def test_a_sigkilled_worker_disappears_after_its_ttl(
    etcd_server: EtcdServer, namespace: str, wait_until
) -> None:
    registry = EtcdRegistry(etcd_server.endpoint, timeout_s=2)
    directory = WorkerDirectory(registry, namespace=namespace).start()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, etcd_server.endpoint, namespace, str(TTL_S)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert directory.wait_for(lambda w: "victim" in w, 20), "the child never registered"
        key = directory.workers()["victim"].key(namespace)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        killed_at = time.monotonic()
        assert registry.get(key) is not None  # nobody revoked it: only the TTL can remove it
        assert directory.wait_for(lambda w: "victim" not in w, BOUND_S)
        assert registry.get(key) is None
        assert time.monotonic() - killed_at <= TTL_S + 2.5
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        directory.close()
        registry.close()


@pytest.mark.etcd
@pytest.mark.parametrize("wipe", [True, False], ids=["wiped", "same-data"])
def test_registration_comes_back_after_an_etcd_outage(
    fresh_etcd: EtcdServer,
    namespace: str,
    wipe: bool,
    caplog: pytest.LogCaptureFixture,
    wait_until,
) -> None:
    caplog.set_level(logging.INFO, logger="fabric.discovery")
    worker_registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=1)
    router_registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=1)
    record = record_of("survivor")
    registration = WorkerRegistration(worker_registry, record, ttl_s=TTL_S, namespace=namespace)
    kinds: list[WorkerEventKind] = []
    directory = WorkerDirectory(
        router_registry,
        namespace=namespace,
        on_change=lambda event: kinds.append(event.kind),
        grace_s=5 * TTL_S,
    )
    try:
        registration.start()
        directory.start()
        assert directory.get("survivor") == record

        fresh_etcd.stop()
        assert wait_until(lambda: not registration.registered, BOUND_S)
        assert wait_until(lambda: not directory.connected, BOUND_S)
        fresh_etcd.restart(wipe=wipe)
        restarted_at = time.monotonic()

        assert wait_until(lambda: registration.registered, BOUND_S)
        assert router_registry.get(record.key(namespace)) == record.to_bytes()
        assert directory.wait_for(lambda w: w.get("survivor") == record, BOUND_S)
        assert wait_until(lambda: directory.connected, BOUND_S)
        assert time.monotonic() - restarted_at < 5.0
        assert kinds == [WorkerEventKind.JOINED]  # with a grace, the outage is no leave
    finally:
        registration.close()
        directory.close()
        worker_registry.close()
        router_registry.close()
    warnings, infos = messages(caplog, logging.WARNING), messages(caplog, logging.INFO)
    assert any("registration of" in m and "lost" in m for m in warnings)
    assert any("registration of" in m and "restored" in m for m in infos)
    if wipe:
        assert any("restored" in m and "a new lease" in m for m in infos)


@pytest.mark.etcd
def test_close_is_bounded_while_etcd_is_down(
    fresh_etcd: EtcdServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = EtcdRegistry(fresh_etcd.endpoint, timeout_s=0.5)
    registration = WorkerRegistration(registry, record_of("stranded"), ttl_s=TTL_S)
    try:
        registration.start()
        fresh_etcd.stop()
        started = time.monotonic()
        registration.close()  # at most one keepalive and one revoke, each 0.5 s
        assert time.monotonic() - started < 2 * 0.5 + 1.0
        assert registration_threads("stranded") == []
    finally:
        registry.close()
    assert any("could not revoke" in m for m in messages(caplog, logging.WARNING))
