"""A worker's health, answered over its metrics HTTP endpoint for orchestrators' probes.

``WorkerHealth`` answers two questions from the worker's own state, never from a cached flag:

- **live**: the scheduler thread runs (the one thread that owns the engine, the pools and the
  peer sockets; ``fabric serve`` also exits within half a second once it died);
- **ready**: live, and the worker's record is registered in etcd: the point from which
  frontends and peers route to it (``build_worker`` registers last). False again while the
  registration is lost (etcd unreachable past the lease) and from the first step of shutdown
  (``WorkerRuntime.drain`` marks the record draining, ``WorkerRuntime.close`` revokes it).

``with_health(app, health)`` wraps the Prometheus WSGI app: ``GET /health/live`` and
``GET /health/ready`` answer 200 or 503 with a one-line JSON body (``{"live": ..., "ready":
...}``); every other path goes to ``app``. Kubernetes probes them (``deploy/k8s``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"


class WorkerHealth:
    """Liveness and readiness of one worker (module docstring).

    Args:
        alive: whether the scheduler thread runs.

    ``registered`` (whether the record is registered) is set once the registration started;
    until then the worker is not ready.
    """

    def __init__(self, alive: Callable[[], bool]) -> None:
        self._alive = alive
        self.registered: Callable[[], bool] | None = None

    @property
    def live(self) -> bool:
        return self._alive()

    @property
    def ready(self) -> bool:
        return self.live and self.registered is not None and self.registered()

    def as_dict(self) -> dict[str, bool]:
        return {"live": self.live, "ready": self.ready}


def with_health(app: WSGIApplication, health: WorkerHealth) -> WSGIApplication:
    """``app`` with ``/health/live`` and ``/health/ready`` answered from ``health`` in front."""
    checks = {LIVE_PATH: "live", READY_PATH: "ready"}

    def routed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return app(environ, start_response)
        state: dict[str, Any] = health.as_dict()
        status = "200 OK" if state[check] else "503 Service Unavailable"
        body = json.dumps(state).encode() + b"\n"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]

    return routed
