"""A node cache read from "another host" over NIXL (``fabric.node.nixl`` / ``fabric.node.remote``):
``python -m fabric.node --nixl --etcd`` registers its segment with a NIXL agent and publishes
the block set beside its etcd record; this process (its UCX limited to TCP on loopback, as
between hosts, like the node cache's) finds both in etcd, pins over the signal channel, READs
over NIXL and unpins: byte-exact, no pin left, a miss is 0. Real etcd, real NIXL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from node_harness import SPEC, WAIT_S, read_json
from node_peer import exact, filled_storage, layout

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.kvbm import SequenceHash, host_storage
from fabric.node import attach_node_cache
from fabric.node.remote import RemoteNodeReader, block_set_in
from fabric.transfer.nixl_agent import NixlAgent

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

TCP = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
TINY = {**SPEC, "layers": 4, "kv_heads": 2, "head_size": 64, "dtype": "float32"}


@pytest.fixture
def etcd() -> Iterator[tuple[str, EtcdRegistry]]:
    with EtcdServer(name=f"node-remote-{uuid.uuid4().hex[:6]}") as server:
        registry = EtcdRegistry(server.endpoint, timeout_s=2.0)
        try:
            yield server.endpoint, registry
        finally:
            registry.close()


def test_a_node_cache_is_read_over_nixl_tcp_after_a_pin_found_through_etcd(
    etcd: tuple[str, EtcdRegistry], namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, registry = etcd
    for name, value in TCP.items():
        monkeypatch.setenv(name, value)
    argv = [sys.executable, "-m", "fabric.node", "--blocks", "8", "--block-size"]
    argv += [str(SPEC["block_size"]), "--model", "tiny", "--namespace", namespace, "--node"]
    argv += ["test", "--nixl", "--etcd", url, "--lease-s", "60"]  # a loaded host: no expiry
    service = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ})
    agent: NixlAgent | None = None
    reader: RemoteNodeReader | None = None
    try:
        ready = read_json(service)
        assert ready["agent_name"]
        stored = [SequenceHash(h) for h in (51, 52, 53, 54)]
        with attach_node_cache(
            ready["endpoint"],
            identity="writer",
            compat_hash=ready["compat_hash"],
            layout=layout(TINY, 1),
        ) as writer:
            assert writer.store(stored, filled_storage(TINY, list(stored)), [0, 1, 2, 3])
            endpoint, block_set = block_set_in(registry, namespace, "test")
            assert endpoint == ready["endpoint"] and block_set.agent_name == ready["agent_name"]
            agent = NixlAgent(f"remote-reader-{uuid.uuid4().hex[:6]}")
            dst = host_storage(layout(TINY, 5), pin=False)
            registration = agent.register(dst.buffers())
            reader = RemoteNodeReader(
                endpoint,
                block_set,
                agent,
                identity="remote",
                compat_hash=ready["compat_hash"],
                layout=layout(TINY, 1),
            )
            asked = [*stored, SequenceHash(55)]
            assert reader.load(asked, dst, [4, 3, 2, 1, 0]) == 4
            moved = host_storage(layout(TINY, 4), pin=False)  # block i of dst is at 4 - i
            for i in range(4):
                moved.tensors[0][i].copy_(dst.tensors[0][4 - i])
            assert exact(moved, list(stored), 4)
            assert reader.load([SequenceHash(99)], dst, [0]) == 0
            stats = writer.stats()
            assert (stats["live_pins"], stats["pins"], stats["unpinned"]) == (0, 1, 1)
            agent.deregister(registration)
    finally:
        if reader is not None:
            reader.close()
        if agent is not None:
            agent.close()
        service.send_signal(signal.SIGTERM)
        service.wait(WAIT_S)
        assert service.stdout is not None
        service.stdout.close()
    assert registry.get(f"/{namespace}/node-cache-nixl/test") is None  # removed on the way out
