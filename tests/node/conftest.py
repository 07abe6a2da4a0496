"""Fixtures of the node cache tests: configs, in-process services (with a manual clock when the
test decides when leases end), peer processes, and the /dev/shm check every test ends with."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_peer import layout

from fabric.kvbm import load_kvbm_config
from fabric.node import (
    NodeCacheClient,
    NodeCacheConfig,
    NodeCacheService,
    attach_node_cache,
    build_node_cache,
)
from fabric.node.config import segment_name

SPEC: dict[str, Any] = {"layers": 2, "kv_heads": 1, "head_size": 8, "block_size": 4}
NUM_BLOCKS = 8
WAIT_S = 180.0  # a bound, never a measurement: peers import torch on a shared 2-core host
PEER = Path(__file__).with_name("node_peer.py")
REPO = PEER.parents[2]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node_config(namespace: str, *, num_blocks: int = NUM_BLOCKS, lease_s: float) -> NodeCacheConfig:
    from node_peer import geometry

    return NodeCacheConfig(
        kvbm=load_kvbm_config(block_size=SPEC["block_size"], cpu_cache_blocks=num_blocks),
        geometry=geometry(SPEC),
        namespace=namespace,
        node="test",
        lease_s=lease_s,
    )


def shm_exists(namespace: str) -> bool:
    return Path("/dev/shm", segment_name(namespace, "test")).exists()


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    leftover = Path("/dev/shm", segment_name(name, "test"))
    if leftover.exists():  # clean up whatever failed, then fail
        leftover.unlink()
        pytest.fail(f"{leftover} was left behind")


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

    def make(service: NodeCacheService, identity: str = "w1") -> NodeCacheClient:
        client = attach_node_cache(
            service.endpoint,
            identity=identity,
            compat_hash=service.cache.geometry.compat_hash,
            layout=layout(SPEC, 1),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def spec_for(endpoint: str, compat_hash: int, identity: str) -> dict[str, Any]:
    return {**SPEC, "endpoint": endpoint, "compat_hash": compat_hash, "identity": identity}


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
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)
        assert proc.stdout is not None
        proc.stdout.close()


def peer_argv(spec: dict[str, Any], command: str, hashes: list[int]) -> list[str]:
    return [str(PEER), json.dumps(spec), command, ",".join(map(str, hashes))]


def read_json(proc: subprocess.Popen[str], timeout_s: float = WAIT_S) -> dict[str, Any]:
    """The next stdout line of ``proc`` that is a JSON object (bounded wait)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"process {proc.args!r} exited ({proc.wait()}) silently")
            if line.startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
    raise AssertionError(f"no JSON line from {proc.args!r} within {timeout_s} s")


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)
