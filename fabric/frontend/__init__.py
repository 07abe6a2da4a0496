"""The OpenAI-compatible frontend and its KV-aware router.

Layers, top down: ``api`` (FastAPI routes, OpenAI errors) and ``responses`` (JSON / SSE bodies)
over ``generation`` (one request's lifecycle: ``Frontend``, ``Generation``), which checks sizes
with ``limits`` and queues requests in ``admission`` until a worker has room, over ``router``
(per-request pins and routes; ``policy`` chooses) over ``fleet`` (the live workers from discovery,
their connections and in-flight load) over ``connection`` (one thread per decode or aggregated
worker, owning its ``SignalClient``) and ``kv_subscriber`` / ``kv_index`` (every worker's KV
events -> which worker caches which prefix, on which tier). ``tokenizer``
holds the text codec and chat template, ``metrics`` the Prometheus metrics, ``server`` the
factory and the uvicorn runners, ``cli`` the command, ``client`` a stdlib client of one streamed
completion (launcher, benchmarks).

Responsiveness: no request can hold the event loop or wait unboundedly. Limits
(``FrontendSettings``, each a flag of ``fabric serve frontend``):

* ``--max-body-bytes`` (4 MiB): a larger body is a 413 before it is read; so is a body of more
  JSON values than 4 per prompt token plus 1024, before it is parsed (``limits``);
* ``--max-prompt-tokens`` (the model's context, else 32768): a longer prompt is a 413, a text
  too long to fit before it is tokenized;
* ``--max-in-flight-per-worker`` (8): this frontend's requests on one serving worker (the
  fleet's load count); more wait in the queue (``admission``);
* ``--max-queued`` (64): requests tokenizing or waiting for room; beyond it a 429 at once;
* ``--queue-timeout`` (1 s from arrival): then a 429; both 429s carry ``Retry-After``;
* ``--tokenizer-threads`` (2): the threads tokenizing prompts off the event loop.

No serving worker is a 503 with ``Retry-After: 5``. Tokenizing runs on the tokenizer threads
(the tokenizer releases the GIL), so ``/health`` and streams keep being served; every bad input
is a 4xx in OpenAI's error JSON, and an unexpected failure a 500 in it. A client that goes away
while its request is queued is never sent; once sent, its worker gets ``Abort``.

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
