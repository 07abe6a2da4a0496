"""Building and serving a frontend: ``build_frontend``, ``run_frontend``, ``BackgroundServer``.

``build_frontend`` wires one ``Frontend`` from a registry and a model (the only place that
constructs collaborators); ``run_frontend`` serves it with uvicorn in the foreground until
SIGINT / SIGTERM; ``BackgroundServer`` serves an app on a uvicorn thread bound to a socket the
caller may leave on an ephemeral port (tests, benchmarks).

Invariant: ``run_frontend`` closes its frontend (router, tokenizer threads) and registry on every
way out; a ``BackgroundServer`` is stopped (``should_exit``, bounded join) by ``stop`` or its
``with`` block.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from fabric.discovery import metrics as etcd_metrics
from fabric.discovery.registry import DEFAULT_NAMESPACE, Registry
from fabric.errors import ConfigError
from fabric.frontend.admission import Admission
from fabric.frontend.api import build_app
from fabric.frontend.api_key import ENV_UPSTREAM_API_KEY_FILE, ApiKey, resolve_api_key
from fabric.frontend.fleet import Fleet
from fabric.frontend.generation import Frontend, FrontendSettings
from fabric.frontend.http_backend import HttpSettings
from fabric.frontend.http_connection import HttpClients
from fabric.frontend.metrics import FrontendMetrics
from fabric.frontend.router import Router
from fabric.frontend.tokenizer import TextCodec, resolve_model
from fabric.signal import metrics as signal_metrics

logger = logging.getLogger(__name__)

_GRACEFUL_S = 2  # open streams get this long to finish at shutdown, then they are cut


def build_frontend(
    registry: Registry,
    model: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    settings: FrontendSettings | None = None,
    identity: str | None = None,
    http: HttpClients | None = None,
) -> Frontend:
    """A frontend for ``model`` (a model directory or a preset name); its router's fleet is started.

    Args:
        identity: the signal identity workers push chunks to; unique per frontend (default
            ``frontend-<random>``).
        http: the HTTP clients for vLLM instances (default: real network, ``HttpSettings()``).
    """
    settings = settings or FrontendSettings()
    resolved = resolve_model(model)
    codec = TextCodec.from_dir(resolved.directory)
    fleet = Fleet(
        registry,
        model_name=resolved.name,
        identity=identity or f"frontend-{uuid.uuid4().hex[:12]}",
        namespace=namespace,
        http=http,
    )
    router = Router(fleet, max_in_flight_per_worker=settings.max_in_flight_per_worker)
    admission = Admission(max_queued=settings.max_queued, queue_timeout_s=settings.queue_timeout_s)
    metrics = FrontendMetrics(fleet.in_flight, fleet.indexed_blocks, lambda: admission.num_queued)
    for transport in (signal_metrics.REGISTRY, etcd_metrics.REGISTRY):  # this process's errors
        metrics.registry.register(transport)
    frontend = Frontend(
        router,
        codec,
        metrics,
        admission,
        ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="frontend-tokenize"),
        model_name=resolved.name,
        settings=settings,
    )
    router.start()
    return frontend


def run_frontend(
    *,
    etcd: str,
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    namespace: str = DEFAULT_NAMESPACE,
    settings: FrontendSettings | None = None,
    api_key_file: str | None = None,
) -> None:
    """Serve the frontend on ``host:port`` until SIGINT / SIGTERM (workers found in ``etcd``).

    Args:
        api_key_file: the clients' API key (else ``FABRIC_API_KEY_FILE``; ``api_key``); the
            key sent to vLLM instances is ``FABRIC_UPSTREAM_API_KEY_FILE``'s.
    """
    from fabric.discovery.etcd import EtcdRegistry  # gRPC: only when serving for real

    api_key = resolve_api_key(api_key_file)
    http = HttpClients(HttpSettings(api_key=ApiKey.from_env(ENV_UPSTREAM_API_KEY_FILE)))
    registry = EtcdRegistry(etcd)
    try:
        frontend = build_frontend(
            registry, model, namespace=namespace, settings=settings, http=http
        )
        try:
            logger.info(
                "serving %s on http://%s:%d (workers from %s; API key %s); cluster page "
                "http://%s:%d/dashboard",
                frontend.model_name,
                host,
                port,
                etcd,
                "required" if api_key else "off",
                host,
                port,
            )
            uvicorn.run(
                build_app(frontend, api_key=api_key),
                host=host,
                port=port,
                log_level="warning",
                timeout_graceful_shutdown=_GRACEFUL_S,
            )
        finally:
            frontend.close()
    finally:
        registry.close()


class BackgroundServer:
    """Serves ``app`` with uvicorn on a daemon thread, on ``host:port`` (0: ephemeral)."""

    def __init__(
        self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0
    ) -> None:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it every response pays a 40 ms Nagle + delayed-ACK stall.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._timeout_s = timeout_s
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=_GRACEFUL_S
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> BackgroundServer:
        """Start serving; returns once uvicorn accepts connections (ConfigError otherwise)."""
        self._thread.start()
        deadline = time.monotonic() + self._timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"uvicorn did not start serving on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait (bounded) for its thread; idempotent."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._timeout_s)
            if self._thread.is_alive():
                logger.warning("uvicorn on %s did not stop in time", self.url)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
