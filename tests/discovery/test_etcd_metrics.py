"""etcd errors as metrics (``fabric.discovery.metrics``): a call to an etcd that is not there
counts a failure of its kind, a watch broken by an etcd stop counts one loss, a registration
whose lease was revoked counts one re-grant."""

from __future__ import annotations

import socket

import pytest
from discovery_harness import BOUND_S, TTL_S, record_of

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.metrics import REGISTRY
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Registry
from fabric.errors import DiscoveryError


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_call_to_an_absent_etcd_counts_a_failure_of_its_kind() -> None:
    registry = EtcdRegistry(f"http://127.0.0.1:{free_port()}", timeout_s=0.5)
    before = {
        kind: sample("fabric_etcd_call_failures_total", call="put", kind=kind)
        for kind in ("timeout", "unavailable")
    }
    try:
        with pytest.raises(DiscoveryError):
            registry.put("/k", b"v")
    finally:
        registry.close()
    moved = {
        kind: sample("fabric_etcd_call_failures_total", call="put", kind=kind) - was
        for kind, was in before.items()
    }
    assert sum(moved.values()) == 1, moved  # not reachable: refused or no answer in time


def test_a_revoked_lease_counts_one_regrant(registry: Registry, namespace: str, wait_until) -> None:
    before = sample("fabric_etcd_lease_regrants_total")
    record = record_of("regranted")
    with WorkerRegistration(registry, record, ttl_s=TTL_S, namespace=namespace) as registration:
        old = registration.lease
        assert old is not None
        assert (
            sample("fabric_etcd_lease_regrants_total") == before
        )  # the first grant is no re-grant
        registry.revoke(old)
        assert wait_until(lambda: sample("fabric_etcd_lease_regrants_total") == before + 1, BOUND_S)
        assert registration.lease is not None and registration.lease.id != old.id


@pytest.mark.etcd
def test_a_broken_watch_counts_one_loss(fresh_etcd: EtcdServer, wait_until) -> None:
    reader = EtcdRegistry(fresh_etcd.endpoint, timeout_s=2)
    try:
        watch = reader.watch_prefix("/m/", lambda event: None)
        before = sample("fabric_etcd_watch_losses_total")
        fresh_etcd.stop()
        assert wait_until(lambda: not watch.connected, 5)
        assert sample("fabric_etcd_watch_losses_total") == before + 1
        fresh_etcd.restart()
        assert wait_until(lambda: watch.connected, 10)
        assert sample("fabric_etcd_watch_losses_total") == before + 1  # one loss, however long
    finally:
        reader.close()
