"""Fixtures of the node cache tests: in-process services (with a manual clock when the test
decides when leases end), attached clients, peer processes, and the /dev/shm check every test
ends with. Helpers live in node_harness."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_harness import PEER, REPO, SPEC, WAIT_S, ManualClock, node_config
from node_peer import layout

from fabric.node import NodeCacheClient, NodeCacheService, attach_node_cache, build_node_cache
from fabric.node.config import segment_name
from fabric.node.index import index_name


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    segment = Path("/dev/shm", segment_name(name, "test"))
    names = (segment.name, f"{segment.name}.owner", index_name(segment.name))
    leftovers = [p for p in (segment.with_name(n) for n in names) if p.exists()]
    for leftover in leftovers:  # clean up whatever failed, then fail
        leftover.unlink()
    if leftovers:
        pytest.fail(f"{leftovers} left behind")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def make_service(namespace: str) -> Iterator[Callable[..., NodeCacheService]]:
    services: list[NodeCacheService] = []

    def make(
        *, lease_s: float = 5.0, clock: Callable[[], float] = time.monotonic, **kw: Any
    ) -> NodeCacheService:
        service = build_node_cache(node_config(namespace, lease_s=lease_s, **kw), clock=clock)
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


@pytest.fixture
def make_client() -> Iterator[Callable[..., NodeCacheClient]]:
    clients: list[NodeCacheClient] = []

    def make(
        service: NodeCacheService, identity: str = "w1", *, optimistic: bool = True
    ) -> NodeCacheClient:
        client = attach_node_cache(
            service.endpoint,
            identity=identity,
            compat_hash=service.cache.geometry.compat_hash,
            layout=layout(SPEC, 1),
            optimistic=optimistic,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def peers() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start processes (``python tests/node/node_peer.py ...`` or any argv); all are killed at
    teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(PEER.parent)},
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:  # SIGTERM first: a node cache unlinks its segment
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(WAIT_S)
        assert proc.stdout is not None
        proc.stdout.close()
