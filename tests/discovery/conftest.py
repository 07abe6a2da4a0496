"""Fixtures for the discovery tests: registries, and etcd servers on ephemeral loopback ports.

Every etcd started here is stopped (SIGTERM, then SIGKILL) and its files removed in teardown.
``etcd_server`` is shared by the session (tests isolate themselves by namespace); ``fresh_etcd``
is private to one test, for tests that stop, restart or wipe it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registry import Registry

ETCD_CALL_TIMEOUT_S = 2.0


Waiter = Callable[[Callable[[], object], float], bool]


def _wait_until(predicate: Callable[[], object], timeout_s: float) -> bool:
    """Poll ``predicate`` until it is truthy; False once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


@pytest.fixture
def wait_until() -> Waiter:
    """``wait_until(predicate, timeout_s) -> bool``: a bounded poll."""
    return _wait_until


def _started(server: EtcdServer) -> Iterator[EtcdServer]:
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    yield from _started(EtcdServer(name="fabric-test-etcd"))


@pytest.fixture
def fresh_etcd() -> Iterator[EtcdServer]:
    yield from _started(EtcdServer(name="fabric-test-etcd-private"))


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests can share one etcd."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def registry(request: pytest.FixtureRequest) -> Iterator[Registry]:
    """Each Registry implementation in turn (etcd on the session server)."""
    if request.param == "memory":
        reg: Registry = InMemoryRegistry()
    else:
        server = request.getfixturevalue("etcd_server")
        reg = EtcdRegistry(server.endpoint, timeout_s=ETCD_CALL_TIMEOUT_S)
    try:
        yield reg
    finally:
        reg.close()
