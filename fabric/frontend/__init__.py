"""The OpenAI-compatible frontend and its KV-aware router.

Layers, top down: ``api`` (FastAPI routes, OpenAI errors) and ``responses`` (JSON / SSE bodies)
over ``generation`` (one request's lifecycle: ``Frontend``, ``Generation``) over ``router``
(per-request pins and routes; ``policy`` chooses) over ``fleet`` (the live workers from discovery,
their connections and in-flight load) over ``connection`` (one thread per decode or aggregated
worker, owning its ``SignalClient``) and ``kv_subscriber`` / ``kv_index`` (every worker's KV
events -> which worker caches which prefix, on which tier). ``tokenizer``
holds the text codec and chat template, ``metrics`` the Prometheus metrics, ``server`` the
factory and the uvicorn runners, ``cli`` the command, ``client`` a stdlib client of one streamed
completion (launcher, benchmarks).

Imports ``discovery``, ``signal``, ``kvbm`` (hashing and the event wire codec, no torch) and
``errors``; ``engine`` only to make a preset model on first use.
"""

from __future__ import annotations

from fabric.frontend.api import build_app
from fabric.frontend.generation import Frontend, FrontendSettings
from fabric.frontend.server import BackgroundServer, build_frontend, run_frontend

__all__ = [
    "BackgroundServer",
    "Frontend",
    "FrontendSettings",
    "build_app",
    "build_frontend",
    "run_frontend",
]
