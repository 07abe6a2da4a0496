"""The node cache in discovery: its record (role ``node-cache``, the host's name in ``node``) on
the wire, the frontend's fleet ignoring it (a node cache is a KV tier, never a worker to route
to), workers finding it by host (``endpoint_in``), and ``python -m fabric.node --etcd``
registering in a real etcd (with its metrics URL, which answers) and revoking on SIGTERM."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable

import httpx
import pytest
from node_harness import node_config, read_json, shm_exists, wait_until

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerDirectory, WorkerRegistration
from fabric.discovery.registry import Role, parse_worker_key, workers_prefix
from fabric.errors import ConfigError, DiscoveryError
from fabric.frontend.dashboard_cluster import Samples
from fabric.frontend.fleet import Fleet
from fabric.kvbm import SequenceHash
from fabric.node import NodeCacheService
from fabric.node.link import endpoint_in
from fabric.node.service import node_record

Start = Callable[[list[str]], subprocess.Popen[str]]


def test_the_node_cache_record_round_trips_with_its_role_and_node(
    make_service: Callable[..., NodeCacheService], namespace: str
) -> None:
    service = make_service()
    config = node_config(namespace, lease_s=5.0)
    record = node_record(service, config, model="tiny")
    assert record.role is Role.NODE_CACHE and record.node == "test"
    assert record.worker_id == "node-cache-test"
    assert record.endpoints.signal == service.endpoint
    assert record.compat_hash == service.cache.geometry.compat_hash
    assert record.layout.num_blocks == config.num_blocks  # type: ignore[union-attr]
    key = record.key(namespace)
    assert parse_worker_key(key, namespace) == (Role.NODE_CACHE, "node-cache-test")
    assert WorkerRecord.from_bytes(record.to_bytes(), key=key) == record


def test_node_is_optional_on_the_wire_and_checked() -> None:
    plain = worker("w", Role.AGGREGATED)
    assert b'"node"' not in plain.to_bytes()
    assert WorkerRecord.from_bytes(plain.to_bytes(), key="k").node is None
    bad = plain.to_bytes().replace(b'"role"', b'"node": 7, "role"')
    with pytest.raises(DiscoveryError, match="node"):
        WorkerRecord.from_bytes(bad, key="k")
    with pytest.raises(ConfigError, match="node is empty"):
        worker("w", Role.AGGREGATED, node="")


def test_the_fleet_ignores_a_node_cache_and_workers_find_theirs_by_host() -> None:
    registry = InMemoryRegistry()
    namespace = "fleet-node"
    records = [
        worker("agg-1", Role.AGGREGATED, node="host-a"),
        worker("node-cache-host-a", Role.NODE_CACHE, node="host-a", signal="tcp://127.0.0.1:7"),
        worker("node-cache-host-b", Role.NODE_CACHE, node="host-b", signal="tcp://127.0.0.1:8"),
    ]
    registrations = [
        WorkerRegistration(registry, r, ttl_s=5.0, namespace=namespace).start() for r in records
    ]
    fleet = Fleet(registry, model_name="tiny", identity="front", namespace=namespace).start()
    directory = WorkerDirectory(registry, namespace=namespace).start()
    try:
        assert set(fleet.workers()) == {"agg-1"}
        assert fleet.count_by_role() == {Role.PREFILL: 0, Role.DECODE: 0, Role.AGGREGATED: 1}
        assert set(fleet.in_flight()) == {"agg-1"}
        assert endpoint_in(directory, node="host-a", compat_hash=1)() == "tcp://127.0.0.1:7"
        assert endpoint_in(directory, node="host-b", compat_hash=1)() == "tcp://127.0.0.1:8"
        assert endpoint_in(directory, node="host-a", compat_hash=2)() is None  # another model
        assert endpoint_in(directory, node="host-c", compat_hash=1)() is None
        registrations[1].close()  # the node cache of host-a stops
        assert endpoint_in(directory, node="host-a", compat_hash=1)() is None
        assert set(fleet.workers()) == {"agg-1"}
    finally:
        directory.close()
        fleet.close()
        for registration in registrations:
            registration.close()
        registry.close()


@pytest.mark.etcd
def test_python_m_fabric_node_registers_in_etcd_and_revokes_on_sigterm(
    namespace: str, peers: Start
) -> None:
    with EtcdServer(name=f"node-{uuid.uuid4().hex[:6]}") as etcd:
        registry = EtcdRegistry(etcd.endpoint, timeout_s=5.0)
        try:
            service = peers(
                [
                    "-m",
                    "fabric.node",
                    "--blocks=8",
                    "--namespace",
                    namespace,
                    "--node",
                    "test",
                    f"--etcd={etcd.endpoint}",
                    "--registration-ttl=2",
                    "--bind-host=0.0.0.0",  # all interfaces, advertised at another address
                    "--advertise-host=127.0.0.2",
                ]
            )
            ready = read_json(service)
            assert ready["worker_id"] == "node-cache-test" and ready["node"] == "test"
            prefix = workers_prefix(namespace, Role.NODE_CACHE)
            found = registry.get_prefix(prefix)
            assert list(found) == [f"{prefix}node-cache-test"]
            record = WorkerRecord.from_bytes(*found.values(), key=prefix)
            assert record.node == "test" and record.endpoints.signal == ready["endpoint"]
            assert record.endpoints.events and record.endpoints.events_replay
            assert record.compat_hash == ready["compat_hash"]
            assert record.endpoints.metrics == ready["metrics"]  # dashboards scrape it
            advertised = [record.endpoints.events, record.endpoints.events_replay]
            assert all(e.startswith("tcp://127.0.0.2:") for e in advertised), record.endpoints
            assert ready["metrics"].startswith("http://127.0.0.2:"), ready
            scraped = Samples.parse(httpx.get(ready["metrics"], timeout=10).text)
            assert scraped.value("fabric_node_cache_blocks_capacity") == 8
            service.terminate()
            assert service.wait(60) == 0
            wait_until(lambda: not registry.get_prefix(prefix), "the record's revocation", 10)
            assert not shm_exists(namespace)
        finally:
            registry.close()


# -- helpers -------------------------------------------------------------------------------------


def worker(
    worker_id: str, role: Role, *, node: str | None = None, signal: str = "tcp://127.0.0.1:9"
) -> WorkerRecord:
    return WorkerRecord(
        worker_id,
        role,
        Endpoints(signal=signal),
        None,
        FabricLayout(model="tiny", block_size=16),
        1,
        0.0,
        node=node,
    )


def test_node_events_carry_the_node_tier_and_the_record_names_their_stream(
    namespace: str,
) -> None:
    import dataclasses

    import zmq
    from node_harness import SPEC
    from node_peer import filled_storage, layout

    from fabric.kvbm import Tier, decode_event_batch
    from fabric.node import attach_node_cache, build_node_cache

    base = node_config(namespace, lease_s=5.0)
    kvbm = base.kvbm.model_copy(
        update={
            "events_endpoint": "tcp://127.0.0.1:0",
            "events_replay_endpoint": "tcp://127.0.0.1:0",
        }
    )
    config = dataclasses.replace(base, kvbm=kvbm)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    with build_node_cache(config) as service:
        record = node_record(service, config, model="tiny")
        assert record.endpoints.events and record.endpoints.events_replay
        client = attach_node_cache(
            service.endpoint,
            identity="w",
            compat_hash=config.compat_hash,
            layout=layout(SPEC, 1),
        )
        try:
            client.store([SequenceHash(7), SequenceHash(8)], filled_storage(SPEC, [7, 8]), [0, 1])
        finally:
            client.close()
        dealer.connect(record.endpoints.events_replay)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert dealer.poll(10_000), "no replay within 10 s"
        _, _, payload = dealer.recv_multipart()
        events = decode_event_batch(payload).events
        assert events and all(event.tier is Tier.NODE for event in events)
    dealer.close(linger=0)
    ctx.term()
