"""A three-member etcd cluster on loopback (``EtcdServer`` with ``EtcdCluster``) and
``EtcdRegistry``'s failover: the member a client uses killed, calls go on without an error,
a watch keeps delivering, a lease stays alive; the leader is found by its status."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_member import EtcdCluster
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registry import WatchEvent
from fabric.errors import ConfigError

pytestmark = pytest.mark.etcd

HOST = "127.0.0.1"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def members(tmp_path: Path) -> Iterator[list[EtcdServer]]:
    ports = _free_ports(6)
    names = [f"member-{i}" for i in range(3)]
    cluster = EtcdCluster(
        tuple((name, f"http://{HOST}:{ports[2 * i + 1]}") for i, name in enumerate(names)),
        token=f"test-{tmp_path.name}",
    )
    servers = [
        EtcdServer(
            client_port=ports[2 * i],
            peer_port=ports[2 * i + 1],
            data_dir=tmp_path / name,
            name=name,
            cluster=cluster,
        )
        for i, name in enumerate(names)
    ]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.close()


def test_a_member_must_be_named_in_its_cluster(tmp_path: Path) -> None:
    cluster = EtcdCluster((("a", "http://127.0.0.1:1"),))
    with pytest.raises(ConfigError, match="must name this member"):
        EtcdServer(name="b", client_port=2, peer_port=3, cluster=cluster, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="client_port and peer_port"):
        EtcdServer(name="a", cluster=cluster, data_dir=tmp_path)


def test_one_leader_among_members(members: list[EtcdServer]) -> None:
    assert sum(member.is_leader() for member in members) == 1


def test_calls_watches_and_leases_survive_the_member_in_use(members: list[EtcdServer]) -> None:
    registry = EtcdRegistry(",".join(m.endpoint for m in members), timeout_s=2.0)
    seen: list[WatchEvent] = []
    got_event = threading.Event()

    def on_event(event: WatchEvent) -> None:
        seen.append(event)
        got_event.set()

    try:
        lease = registry.grant_lease(5)
        registry.put("/t/a", b"1", lease=lease)
        watch = registry.watch_prefix("/t/", on_event)
        in_use = registry._client.endpoint_in_use.netloc
        victim = next(m for m in members if m.endpoint.endswith(in_use))
        victim.kill()
        # the next calls go to another member, without an error
        registry.put("/t/b", b"2")
        assert registry.get("/t/a") == b"1"
        assert registry.keepalive(lease)
        # the watch moved too: a change after the kill is delivered
        assert got_event.wait(15), "the watch delivered nothing after the member was killed"
        assert {e.key for e in seen} >= {"/t/b"}
        watch.cancel()
    finally:
        registry.close()
