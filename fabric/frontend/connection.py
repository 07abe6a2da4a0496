"""One frontend-to-worker signal connection: a thread that owns a ``SignalClient``.

Owns ``ChunkStream`` (the per-request queue the event loop reads) and ``WorkerConnection`` (the
thread that sends ``GenerateRequest`` / ``Abort`` to one decode or aggregated worker and routes
the ``TokenChunk``s it pushes back to their streams).

Threads: the ``SignalClient`` is created, used and closed by the connection's thread only (ZMQ
sockets are single-owner). The event loop talks to it through a thread-safe inbox (``submit``,
``abort``); the thread hands chunks back with ``loop.call_soon_threadsafe``. ``SignalClient`` has
no pollable handle, so the thread blocks on its inbox while no request is in flight (a submit
wakes it at once) and, while requests are in flight, alternates draining the inbox with
``receive(busy_poll_s)`` (a chunk is returned as soon as it arrives; a submit waits at most
``busy_poll_s``).

Invariants:

* A stream receives chunks in the order the worker sent them, and after its ``finished`` chunk
  or a ``StreamFailure`` nothing more.
* Every stream registered with the connection ends: with its finished chunk, an ``ErrorReply``
  naming it (500), a failed send (503), or ``close`` (503, the worker left); ``abort`` drops it
  without an item (the reader is gone). An ``ErrorReply`` with ``ErrorCode.UNAVAILABLE`` (the
  worker drains and refused the request before starting it) is a ``StreamFailure`` marked
  ``refused`` (503): it leaves this connection but not the stream, which the router may hand to
  another worker (``RoutedRequest.next_item``).
* Queues are bounded (``max_chunks``): a stream whose reader falls that far behind fails with a
  503 instead of growing without bound; the reader then aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

from fabric.discovery.records import WorkerRecord
from fabric.errors import ConfigError, FabricError
from fabric.signal.client import SignalClient
from fabric.signal.errors import ErrorCode
from fabric.signal.messages import Abort, ErrorReply, GenerateRequest, Message, TokenChunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamFailure:
    """A request ended without a finished chunk; ``status`` is the HTTP status to answer."""

    status: int
    message: str
    code: str = "worker_unavailable"
    refused: bool = False
    """The worker refused the request before starting it (it drains): another may serve it,
    and the stream stays open for that."""


StreamItem = TokenChunk | StreamFailure


class ChunkStream:
    """A bounded queue of one request's chunks, written from any thread, read on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_chunks: int) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue(max_chunks)
        self._ended = False  # set on the loop: the last item was queued

    def push_threadsafe(self, item: StreamItem) -> None:
        """Queue ``item`` from any thread (dropped if the loop is already closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._push, item)

    async def get(self, timeout_s: float) -> StreamItem | None:
        """The next item, or None when none arrived within ``timeout_s``."""
        if not self._queue.empty():  # the common case while streaming: no timer, no task
            return self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None

    def _push(self, item: StreamItem) -> None:
        if self._ended:
            return
        if self._queue.full():
            while not self._queue.empty():
                self._queue.get_nowait()
            item = StreamFailure(
                503,
                f"more than {self._queue.maxsize} chunks were waiting: the client reads too slowly",
            )
        self._ended = not item.refused if isinstance(item, StreamFailure) else item.finished
        self._queue.put_nowait(item)


class ServingConnection(Protocol):
    """What the router needs of a connection to a serving worker: this module's
    ``WorkerConnection`` (signals) or ``http_connection.HttpConnection`` (a vLLM instance)."""

    record: WorkerRecord

    @property
    def worker_id(self) -> str: ...

    def submit(
        self, request: GenerateRequest, stream: ChunkStream, source: WorkerRecord | None = None
    ) -> None: ...

    def abort(self, request_id: str, reason: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Submit:
    request: GenerateRequest
    stream: ChunkStream


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str
    reason: str


_Op = _Submit | _Abort | None  # None: stop


class WorkerConnection:
    """The signal channel to one decode or aggregated worker (see the module docstring)."""

    def __init__(
        self,
        record: WorkerRecord,
        *,
        identity: str,
        busy_poll_s: float = 0.002,
        idle_wait_s: float = 0.1,
        close_timeout_s: float = 2.0,
    ) -> None:
        """Start the connection thread (ZMQ connects lazily: the worker may come up later).

        Args:
            record: the worker's record; its ``endpoints.signal`` and ``compat_hash`` are used.
            identity: this frontend's id, the client identity the worker pushes chunks to.

        Raises:
            ConfigError: the record names no signal endpoint.
        """
        if record.endpoints.signal is None:
            raise ConfigError(f"worker {record.worker_id} publishes no signal endpoint")
        self.record = record
        self._endpoint = record.endpoints.signal
        self._identity = identity
        self._busy_poll_s = busy_poll_s
        self._idle_wait_s = idle_wait_s
        self._close_timeout_s = close_timeout_s
        self._inbox: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._streams: dict[str, ChunkStream] = {}  # owned by the thread
        self._thread = threading.Thread(
            target=self._run, name=f"signal:{record.worker_id}", daemon=True
        )
        self._thread.start()

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def submit(
        self, request: GenerateRequest, stream: ChunkStream, source: WorkerRecord | None = None
    ) -> None:
        """Send ``request``; its chunks (or a ``StreamFailure``) go to ``stream``. Any thread.

        ``source`` (the KV source's record) is not needed: the worker finds it by
        ``request.prefill_worker`` itself.
        """
        self._inbox.put(_Submit(request, stream))

    def abort(self, request_id: str, reason: str) -> None:
        """Send ``Abort`` and stop routing the request's chunks. Any thread; idempotent."""
        self._inbox.put(_Abort(request_id, reason))

    def close(self) -> None:
        """Fail every open stream (503), close the client and join the thread (bounded)."""
        self._inbox.put(None)
        self._thread.join(self._close_timeout_s)
        if self._thread.is_alive():
            logger.warning("signal connection to %s did not stop in time", self.worker_id)

    # Connection thread
    # -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        client = SignalClient(
            self._endpoint,
            identity=self._identity,
            compat_hash=self.record.compat_hash,
        )
        try:
            running = True
            while running:
                ops, running = self._take_ops()
                for op in ops:
                    self._apply(client, op)
                if running and self._streams:
                    self._receive_one(client)
        except Exception:
            logger.exception("signal connection to %s failed", self.worker_id)
        finally:
            client.close()
            self._fail_all(f"worker {self.worker_id} left while the request was running")

    def _take_ops(self) -> tuple[list[_Submit | _Abort], bool]:
        """The queued operations (waiting up to ``idle_wait_s`` when idle), and False on stop."""
        ops: list[_Submit | _Abort] = []
        block = not self._streams
        while True:
            try:
                op = self._inbox.get(True, self._idle_wait_s) if block else self._inbox.get_nowait()
            except queue.Empty:
                return ops, True
            if op is None:
                return ops, False
            ops.append(op)
            block = False

    def _apply(self, client: SignalClient, op: _Submit | _Abort) -> None:
        if isinstance(op, _Submit):
            self._send_request(client, op)
        else:
            self._streams.pop(op.request_id, None)
            self._send(client, Abort(op.request_id, op.reason))

    def _receive_one(self, client: SignalClient) -> None:
        try:
            message = client.receive(self._busy_poll_s)
        except FabricError as exc:  # an undecodable push: dropped, the stream goes on
            logger.warning("dropped a message from %s: %s", self.worker_id, exc)
            return
        if message is not None:
            self._dispatch(message)

    def _send_request(self, client: SignalClient, op: _Submit) -> None:
        request_id = op.request.request_id
        self._streams[request_id] = op.stream
        error = self._send(client, op.request)
        if error is not None:
            self._streams.pop(request_id, None)
            op.stream.push_threadsafe(StreamFailure(503, error))

    def _send(self, client: SignalClient, message: GenerateRequest | Abort) -> str | None:
        """Send one-way; the error text when it could not be sent."""
        try:
            client.send(message)
        except FabricError as exc:
            logger.warning("%s to %s not sent: %s", type(message).__name__, self.worker_id, exc)
            return f"could not send the request to worker {self.worker_id}: {exc}"
        return None

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, TokenChunk):
            stream = self._streams.get(message.request_id)
            if stream is None:
                logger.debug("dropped a chunk of finished or aborted %s", message.request_id)
                return
            if message.finished:
                del self._streams[message.request_id]
            stream.push_threadsafe(message)
        elif isinstance(message, ErrorReply):
            stream = self._streams.pop(message.request_id or "", None)
            if stream is None:
                logger.warning("worker %s refused a message: %s", self.worker_id, message.message)
                return
            refused = message.code is ErrorCode.UNAVAILABLE
            stream.push_threadsafe(
                StreamFailure(
                    503 if refused else 500,
                    f"worker {self.worker_id}: {message.message}",
                    "worker_draining" if refused else "worker_unavailable",
                    refused=refused,
                )
            )
        else:
            logger.warning("unexpected %s from %s", type(message).__name__, self.worker_id)

    def _fail_all(self, reason: str) -> None:
        """Fail the open streams and those submitted after ``close`` (a race with leaving)."""
        streams = list(self._streams.values())
        self._streams = {}
        while True:
            try:
                op = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(op, _Submit):
                streams.append(op.stream)
        for stream in streams:
            stream.push_threadsafe(StreamFailure(503, reason))
