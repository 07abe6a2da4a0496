"""A worker's Prometheus metrics: its counters next to the KVBM's, served over HTTP.

``WorkerMetrics`` adds ``fabric_worker_*`` metrics to the manager's private registry (one
registry per worker, so one scrape shows the pools and the requests together);
``MetricsServer`` serves that registry on ``http://127.0.0.1:<ephemeral port>/metrics`` (or the
host and port given) from a daemon thread, with the worker's ``/health/live`` and
``/health/ready`` beside it when given a ``WorkerHealth`` (``fabric.worker.health``). Metrics are
written by the scheduler thread only; prometheus_client makes the scrape thread's reads safe.
"""

from __future__ import annotations

import logging
import socket
import threading
from enum import Enum
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from fabric.worker.health import WorkerHealth, with_health

logger = logging.getLogger(__name__)

PREFIX = "fabric_worker_"


class ErrorKind(Enum):
    """Why a request ended with an error (the ``kind`` label of ``errors_total``)."""

    REFUSED = "refused"
    """Invalid, too large for the pool, queue full, past its deadline."""
    PREFILL_FAILED = "prefill_failed"
    """Its prefill worker failed and the fallback is ``fail``."""
    ABORTED = "aborted"
    """The client aborted it (``Abort``)."""
    DISCONNECTED = "disconnected"
    """Its chunks could not be delivered: the client is gone."""
    INTERNAL = "internal"
    SHUTDOWN = "shutdown"


class WorkerMetrics:
    """Request counters and occupancy gauges of one worker."""

    def __init__(
        self, registry: CollectorRegistry, *, role: str, worker_id: str, model: str
    ) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, registry=registry)

        info = Gauge(
            PREFIX + "info",
            "Constant 1, labelled with the worker's facts.",
            ("role", "worker_id", "model"),
            registry=registry,
        )
        info.labels(role, worker_id, model).set(1)
        self.requests = counter("requests", "Requests received.", ("kind",))
        self.finished = counter("finished", "Requests finished, by finish reason.", ("reason",))
        self.errors = counter("errors", "Requests ended by an error, by kind.", ("kind",))
        self.computed_tokens = counter("computed_tokens", "Prompt positions computed here.")
        self.cached_tokens = counter(
            "cached_tokens", "Prompt positions served from a cache (no compute anywhere)."
        )
        self.generated_tokens = counter("generated_tokens", "Tokens streamed to clients.")
        self.prefill_chunks = counter(
            "prefill_chunks",
            "Prompt chunks computed by engine steps here (a prompt longer than the step's token "
            "budget takes several).",
        )
        self.decode_steps = counter("decode_steps", "Batched decode steps run.")
        self.decode_tokens = counter(
            "decode_tokens", "Tokens computed by decode steps (over decode_steps: the batch size)."
        )
        self.transferred_blocks = counter(
            "transferred_blocks", "KV blocks read from prefill workers."
        )
        self.fallbacks = counter(
            "prefill_fallbacks", "Prompts recomputed here after a prefill worker failed."
        )
        self.waiting = gauge("waiting_requests", "Requests waiting for device blocks.")
        self.active = gauge("active_requests", "Requests prefilling remotely or decoding.")
        self.held_handoffs = gauge(
            "held_handoffs", "Prefill workers: requests whose blocks wait for a decode's read."
        )

    def record_error(self, kind: ErrorKind) -> None:
        self.errors.labels(kind.value).inc()
        self.finished.labels("error").inc()


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class MetricsServer:
    """``/metrics`` of ``registry`` over HTTP on ``host`` (an ephemeral port unless given), and
    ``/health/live`` / ``/health/ready`` with ``health``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        health: WorkerHealth | None = None,
    ):
        app = make_wsgi_app(registry)
        if health is not None:
            app = with_health(app, health)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or 6
        server = type("MetricsHttpServer", (ThreadingWSGIServer,), {"address_family": family})
        self._httpd: WSGIServer = make_server(host, port, app, server, _QuietHandler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        self.url = f"http://{host}:{self._httpd.server_port}/metrics"
        logger.info("metrics on %s", self.url)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop serving and free the port (idempotent)."""
        if not self._thread.is_alive():
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout_s)
