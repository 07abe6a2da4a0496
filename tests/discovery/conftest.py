"""Fixtures for the discovery tests: registries, and etcd servers on ephemeral loopback ports.

Every etcd started here is stopped (SIGTERM, then SIGKILL) and its files removed in teardown.
``etcd_server`` is shared by the session (tests isolate themselves by namespace); ``fresh_etcd``
is private to one test, for tests that stop, restart or wipe it. ``auth_etcd`` (users, password
over plain HTTP/2) and ``tls_etcd`` (TLS, client certificates, users) are session servers with
authentication on, whose fabric user may use every test namespace (``TEST_PREFIX``).
No ``FABRIC_ETCD_*`` variable of the caller's environment reaches a test.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from discovery_harness import USERS, cert_only

from fabric.discovery import etcd_auth
from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_certs import TlsMaterial, generate
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registry import Registry

ETCD_CALL_TIMEOUT_S = 2.0
_ENV_VARS = (
    etcd_auth.ENV_USER,
    etcd_auth.ENV_PASSWORD,
    etcd_auth.ENV_PASSWORD_FILE,
    etcd_auth.ENV_CA_FILE,
    etcd_auth.ENV_CERT_FILE,
    etcd_auth.ENV_KEY_FILE,
)


@pytest.fixture(autouse=True)
def _no_etcd_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


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


@pytest.fixture(scope="session")
def tls_material() -> Iterator[TlsMaterial]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with CN ``fabric``."""
    directory = Path(tempfile.mkdtemp(prefix="fabric-etcd-tls-"))
    try:
        yield generate(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def auth_etcd() -> Iterator[EtcdServer]:
    yield from _started(EtcdServer(name="fabric-test-etcd-auth", users=USERS))


@pytest.fixture(scope="session")
def tls_etcd(tls_material: TlsMaterial) -> Iterator[EtcdServer]:
    server = EtcdServer(
        name="fabric-test-etcd-tls", tls=tls_material, client_cert_auth=True, users=USERS
    )
    yield from _started(server)


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests can share one etcd."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(
    params=[
        "memory",
        pytest.param("etcd", marks=pytest.mark.etcd),
        pytest.param("etcd-password", marks=pytest.mark.etcd),
        pytest.param("etcd-client-cert", marks=pytest.mark.etcd),
    ]
)
def registry(request: pytest.FixtureRequest) -> Iterator[Registry]:
    """Each Registry implementation in turn (etcd on the session servers: plain; with a user
    and password; over TLS as the user a client certificate names)."""
    if request.param == "memory":
        reg: Registry = InMemoryRegistry()
    elif request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        reg = EtcdRegistry(server.endpoint, timeout_s=ETCD_CALL_TIMEOUT_S)
    elif request.param == "etcd-password":
        server = request.getfixturevalue("auth_etcd")
        # A login is a bcrypt check on etcd's side: on two busy cores it has taken over 2 s.
        reg = EtcdRegistry(
            server.endpoint, timeout_s=3 * ETCD_CALL_TIMEOUT_S, auth=server.client_auth
        )
    else:
        server = request.getfixturevalue("tls_etcd")
        reg = EtcdRegistry(server.endpoint, timeout_s=ETCD_CALL_TIMEOUT_S, auth=cert_only(server))
    try:
        yield reg
    finally:
        reg.close()
