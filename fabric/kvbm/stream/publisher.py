"""ZmqEventPublisher: our KV events on vLLM's ZMQ stream, with a replay socket.

Invariants:

* ``ZmqEventPublisher`` never blocks its caller on I/O: ``publish`` appends to a bounded queue that
  a background thread drains. When the queue is full the oldest queued batch is dropped and
  counted (``num_dropped``); its sequence number is never sent, so subscribers see the gap.
  Sequence numbers grow by exactly one per batch accepted by ``publish``, starting at 0.

Replay: a ROUTER socket takes ``[identity, b"", start_seq (8-byte big-endian)]`` and answers
``[identity, b"", seq, payload]`` for every buffered batch with ``seq >= start_seq``, then
``[identity, b"", -1 (8 bytes, signed), b""]``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence

import msgpack
import zmq

from fabric.auth import keys_from_env, release_context, secure_server
from fabric.errors import ConfigError, InvalidTransition
from fabric.kvbm.core.events import KvEvent
from fabric.kvbm.stream.wire import WireFormat, batch_to_wire

logger = logging.getLogger(__name__)


_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class ZmqEventPublisher:
    """vLLM-compatible PUB stream of KV event batches with a ROUTER replay socket.

    Sockets are created and bound in the constructor (so a busy port fails there, as
    ``ConfigError``) and from then on used only by the publisher thread, which closes them
    (linger 0) and terminates their private ``zmq.Context`` when it exits: once ``close``
    returns, the ports are free again (ZMQ otherwise releases them asynchronously).

    ``publish`` only appends to a bounded queue and, when the queue was empty, writes one wake-up
    byte to a socketpair the thread polls together with the replay socket, so an idle publisher
    costs no CPU and a batch is sent as soon as it is queued.

    Backpressure: the queue holds ``max_queue_size`` batches; beyond that the oldest is dropped
    (``num_dropped``, logged at WARNING at powers of two). Dropping keeps the scheduler's hot path
    free of waits; the dropped sequence number leaves a gap subscribers can see.
    """

    enabled = True

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        topic: str = "kv-events",
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
        data_parallel_rank: int = 0,
        wire_format: WireFormat = WireFormat.MAP,
        close_timeout: float = 2.0,
    ) -> None:
        """Bind the sockets and start the publisher thread.

        Args:
            endpoint: PUB address to bind, e.g. ``tcp://127.0.0.1:5557`` (port 0 picks one).
            replay_endpoint: ROUTER address to bind for replay requests; None disables replay.
            buffer_steps: how many of the latest batches replay can serve.
            hwm: ZMQ send high-water mark of the PUB socket (messages beyond it are dropped).
            max_queue_size: batches that may wait for the publisher thread.
            close_timeout: how long ``close`` waits for the thread to flush and exit.
        """
        if buffer_steps < 1 or max_queue_size < 1:
            raise ConfigError("buffer_steps and max_queue_size must be at least 1")
        self._topic = topic.encode()
        self._data_parallel_rank = data_parallel_rank
        self._wire_format = wire_format
        self._close_timeout = close_timeout
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, float, tuple[KvEvent, ...]]] = deque()
        self._max_queue_size = max_queue_size
        self._next_seq = 0
        self._num_dropped = 0
        self._closing = False

        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = self._ctx.socket(zmq.ROUTER) if replay_endpoint is not None else None
        self._wake_recv, self._wake_send = socket.socketpair()
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            keys = keys_from_env()  # CURVE when the deployment has keys (fabric.auth)
            secure_server(self._pub, keys)
            if self._replay is not None:
                secure_server(self._replay, keys)
            self._endpoint = self._bind(self._pub, endpoint)
            self._replay_endpoint = None
            if self._replay is not None and replay_endpoint is not None:
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay_endpoint = self._bind(self._replay, replay_endpoint)
            self._wake_recv.setblocking(False)
            self._wake_send.setblocking(False)
        except BaseException:
            self._close_sockets()
            self._wake_send.close()
            raise
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()
        logger.info(
            "publishing KV events on %s (replay %s, topic %r)",
            self._endpoint,
            self._replay_endpoint,
            topic,
        )

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"cannot bind KV event endpoint {endpoint!r}: {exc}; use a free port (or port 0)"
            ) from exc
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def endpoint(self) -> str:
        """The bound PUB endpoint (the real port when 0 was asked for)."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The bound ROUTER endpoint, or None without replay."""
        return self._replay_endpoint

    @property
    def num_dropped(self) -> int:
        """Batches dropped because the queue was full."""
        return self._num_dropped

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Queue one batch (timestamped now) for the publisher thread; empty batches are skipped.

        Raises:
            InvalidTransition: the publisher was closed.
        """
        if not events:
            return
        batch = tuple(events)
        ts = time.time()
        with self._lock:
            if self._closing:
                raise InvalidTransition("ZmqEventPublisher.publish() after close()")
            was_empty = not self._pending
            if len(self._pending) >= self._max_queue_size:
                self._pending.popleft()
                self._num_dropped += 1
                if self._num_dropped & (self._num_dropped - 1) == 0:
                    logger.warning(
                        "KV event queue full (%d batches): %d batches dropped so far",
                        self._max_queue_size,
                        self._num_dropped,
                    )
            self._pending.append((self._next_seq, ts, batch))
            self._next_seq += 1
        if was_empty:
            self._wake()

    def close(self) -> None:
        """Send what is queued, stop the thread (waiting at most ``close_timeout``) and unbind.

        Idempotent; calling it again waits again for a thread that outlived the first call.
        """
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(self._close_timeout)
        if self._thread.is_alive():
            logger.warning(
                "KV event publisher thread still running after %.1f s; its sockets close when it "
                "exits",
                self._close_timeout,
            )
        self._wake_send.close()

    def _wake(self) -> None:
        # Full: a wake-up byte is already waiting. Broken: the thread is gone.
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_recv, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        packer = msgpack.Packer()
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_recv.fileno() in ready:  # plain sockets poll by fd
                    self._drain_wake()
                with self._lock:
                    batches, self._pending = self._pending, deque()
                    closing = self._closing
                for seq, ts, events in batches:
                    self._send(packer, seq, ts, events)
                if self._replay is not None and self._replay in ready:
                    self._serve_replay(self._replay)
                if closing:
                    return
        except Exception:
            logger.exception("KV event publisher thread failed; no more events are sent")
        finally:
            self._close_sockets()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_recv.recv(4096):
                pass

    def _send(
        self, packer: msgpack.Packer, seq: int, ts: float, events: tuple[KvEvent, ...]
    ) -> None:
        try:
            wire = batch_to_wire(ts, events, self._data_parallel_rank, self._wire_format)
            payload = packer.pack(wire)
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        except Exception:
            logger.exception("KV event batch %d could not be sent; dropped", seq)
            return
        self._buffer.append((seq, payload))

    def _serve_replay(self, replay: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring malformed KV event replay request %r", frames)
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            logger.debug("replaying KV events from %d", start_seq)
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            replay.send_multipart((client, b"", _END_SEQ, b""))

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        release_context(self._ctx)  # its CURVE authenticator, if any, holds a socket in it
        self._ctx.term()  # returns once ZMQ has really closed the sockets and freed the ports
        self._wake_recv.close()
