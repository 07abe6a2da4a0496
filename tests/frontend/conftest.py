"""Fixtures: the tiny model's tokenizer, an in-memory registry, fake workers and frontends.

Every server started here (signal servers, uvicorn threads, registrations, routers) is stopped
in teardown; ports are ephemeral on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frontend_fakes import FakeWorker, RunningFrontend

from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registry import Registry, Role
from fabric.frontend.api import build_app
from fabric.frontend.api_key import ApiKey
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.server import BackgroundServer, build_frontend
from fabric.frontend.tokenizer import TextCodec


@pytest.fixture(scope="session")
def model_dir(tiny_dir: Path) -> Path:
    """The tiny preset; its name (and the served model) is ``tiny``."""
    return tiny_dir


@pytest.fixture(scope="session")
def codec(model_dir: Path) -> TextCodec:
    return TextCodec.from_dir(model_dir)


@pytest.fixture
def registry() -> Iterator[InMemoryRegistry]:
    reg = InMemoryRegistry()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def make_worker(
    registry: InMemoryRegistry, codec: TextCodec
) -> Iterator[Callable[..., FakeWorker]]:
    """``make_worker(worker_id, role=Role.DECODE, model="tiny", events=False, node=None)``: a
    registered fake worker (with ``events``: publishing KV events; ``node``: its record's)."""
    workers: list[FakeWorker] = []

    def make(
        worker_id: str,
        *,
        role: Role = Role.DECODE,
        model: str = "tiny",
        events: bool = False,
        node: str | None = None,
    ) -> FakeWorker:
        worker = FakeWorker(
            registry, worker_id, codec, role=role, model=model, events=events, node=node
        )
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close()


@pytest.fixture
def start_frontend(
    registry: InMemoryRegistry, model_dir: Path
) -> Iterator[Callable[..., RunningFrontend]]:
    """``start_frontend(settings=None, registry=None, api_key=None)``: a frontend served on an
    ephemeral port."""
    running: list[RunningFrontend] = []

    def start(
        settings: FrontendSettings | None = None,
        on_registry: Registry | None = None,
        api_key: ApiKey | None = None,
    ) -> RunningFrontend:
        frontend = build_frontend(
            on_registry or registry,
            str(model_dir),
            settings=settings or FrontendSettings(idle_timeout_s=5.0, request_timeout_s=30.0),
        )
        try:
            server = BackgroundServer(build_app(frontend, api_key=api_key)).start()
        except BaseException:
            frontend.close()
            raise
        running.append(RunningFrontend(frontend, server))
        return running[-1]

    yield start
    for item in running:
        item.server.stop()
        item.frontend.close()
