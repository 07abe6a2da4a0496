"""The frontend's connection to one HTTP worker (a vLLM instance): ``HttpConnection``.

The HTTP twin of ``connection.WorkerConnection``, with the same verbs (``submit``, ``abort``,
``close``), so the router and ``Generation`` treat both alike. Each submitted request is one
asyncio task on the event loop of its ``ChunkStream`` that runs ``http_backend.generate`` and
pushes its chunks to the stream; ``HttpClients`` holds the ``httpx.AsyncClient`` (connection
pool) of each event loop, shared by every HTTP connection of one router.

Invariants (as ``WorkerConnection``'s):

* Every stream submitted ends: with its finished chunk, a ``StreamFailure`` (the upstream's
  error mapped by ``http_backend``), or on ``close`` a 503 (the worker left); ``abort`` ends it
  without an item (the reader is gone) and cancels the task, which closes the upstream
  connection, so vLLM aborts the request.
* ``submit``, ``abort`` and ``close`` may be called from any thread: the task is created and
  cancelled on its loop (``run_coroutine_threadsafe``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading

import httpx

from fabric.discovery.records import WorkerRecord
from fabric.frontend.connection import ChunkStream, StreamFailure
from fabric.frontend.http_backend import HttpSettings, UpstreamError, generate
from fabric.signal.messages import GenerateRequest

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0


class HttpClients:
    """One ``httpx.AsyncClient`` per event loop (clients are bound to the loop that uses them)."""

    def __init__(
        self,
        settings: HttpSettings | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Args:
        transport: replaces the network (tests: ``httpx.MockTransport``).
        """
        self.settings = settings or HttpSettings()
        self._transport = transport
        self._lock = threading.Lock()
        self._loop_to_client: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def get(self) -> httpx.AsyncClient:
        """The running loop's client (created on first use). Call on the loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._loop_to_client.get(loop)
            if client is None:
                client = httpx.AsyncClient(
                    timeout=self.settings.timeout(),
                    headers=self.settings.headers(),
                    transport=self._transport,
                )
                self._loop_to_client[loop] = client
            return client

    def close(self) -> None:
        """Close every client whose loop still runs (bounded); drop the others."""
        with self._lock:
            items = list(self._loop_to_client.items())
            self._loop_to_client.clear()
        for loop, client in items:
            if loop.is_closed() or not loop.is_running():
                continue
            future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            with contextlib.suppress(Exception):
                if _on_loop(loop):
                    continue  # closing from the loop itself: the task finishes on its own
                future.result(_CLOSE_TIMEOUT_S)


class HttpConnection:
    """Requests to one HTTP worker, one task each (see the module docstring)."""

    def __init__(self, record: WorkerRecord, clients: HttpClients) -> None:
        self.record = record
        self._clients = clients
        self._lock = threading.Lock()
        self._closed = False
        self._running: dict[str, tuple[concurrent.futures.Future[None], ChunkStream]] = {}

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def submit(
        self, request: GenerateRequest, stream: ChunkStream, source: WorkerRecord | None = None
    ) -> None:
        """Start ``request`` (prefilled on ``source`` when given); its chunks go to ``stream``."""
        with self._lock:
            if self._closed:
                stream.push_threadsafe(StreamFailure(503, f"worker {self.worker_id} left"))
                return
            coroutine = self._run(request, stream, source)
            future = asyncio.run_coroutine_threadsafe(coroutine, stream.loop)
            self._running[request.request_id] = (future, stream)

    def abort(self, request_id: str, reason: str) -> None:
        """Stop the request (closes the upstream connection); idempotent, any thread."""
        with self._lock:
            running = self._running.pop(request_id, None)
        if running is not None:
            logger.debug("%s on %s aborted: %s", request_id, self.worker_id, reason)
            running[0].cancel()

    def close(self) -> None:
        """Fail every open request with 503 and cancel it (the worker left)."""
        with self._lock:
            self._closed = True
            running = list(self._running.values())
            self._running.clear()
        for future, stream in running:
            stream.push_threadsafe(
                StreamFailure(503, f"worker {self.worker_id} left while the request was running")
            )
            future.cancel()

    async def _run(
        self, request: GenerateRequest, stream: ChunkStream, source: WorkerRecord | None
    ) -> None:
        request_id = request.request_id
        try:
            async for chunk in generate(self._clients.get(), self.record, request, source):
                stream.push_threadsafe(chunk)
        except UpstreamError as exc:
            logger.warning("%s on %s failed: %s", request_id, self.worker_id, exc.message)
            stream.push_threadsafe(StreamFailure(exc.status, exc.message, code=_code(exc.status)))
        except Exception as exc:  # a bug must end the stream, not leave its reader waiting
            logger.exception("%s on %s failed", request_id, self.worker_id)
            stream.push_threadsafe(StreamFailure(500, f"worker {self.worker_id}: {exc!r}"))
        finally:
            with self._lock:
                self._running.pop(request_id, None)


def _code(status: int) -> str:
    return {400: "invalid_value", 504: "timeout"}.get(status, "worker_unavailable")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
